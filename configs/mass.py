"""MASS: mask one contiguous fragment of ~50% of each chunk in the encoder input; the decoder
reads the fragment shifted right and predicts it (loss on the fragment only). The fragment
starts at the beginning 20% of the time, at the end 20%, anywhere 60% (the MASS code).

    t5x-like train --config configs/mass.py:tiny --workdir runs/mass_tiny
    t5x-like eval --checkpoint runs/mass_tiny

The encoder-decoder is BART's (post-LN, GELU, learned positions, tied embeddings). Presets:
``tiny`` (CPU minutes), ``small`` (6+6 x 512), ``base`` (6+6 x 768, 12 heads, 512 tokens,
dropout 0.1, AdamW b2 0.98 with linear decay). ``--config.objective.fragment_ratio``,
``start_at_beginning``, ``start_at_end`` change the fragment.
"""

from t5x_like.config import base_config

SIZES = {
    #        d_model heads d_ff enc dec inputs_length batch
    "tiny": (128, 4, 512, 2, 2, 128, 16),
    "small": (512, 8, 2048, 6, 6, 512, 64),
    "base": (768, 12, 3072, 6, 6, 512, 256),
}


def get_config(arg=None):
    preset = arg or "small"
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(SIZES)}")
    c = base_config("mass")
    d_model, heads, d_ff, enc, dec, length, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_ff=d_ff, num_encoder_layers=enc,
                        num_decoder_layers=dec, max_position_embeddings=max(length, 1024)))
    c.data.inputs_length = length
    c.data.batch_size = batch
    c.loss.z_loss = 0.0
    c.optimizer.update(dict(name="adamw", schedule="linear", b1=0.9, b2=0.98, eps=1e-6,
                            weight_decay=0.01, grad_clip_norm=1.0))
    if preset == "tiny":
        c.model.update(dict(scan_layers=False, dropout_rate=0.0))
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 100
        c.train.update(dict(num_steps=1000, log_every=25, eval_every=500, eval_batches=8,
                            checkpoint_every=250))
    else:
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 4000
        c.train.update(dict(num_steps=500_000, log_every=100, eval_every=5000,
                            checkpoint_every=5000))
    c.lock()
    return c
