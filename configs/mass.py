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

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model heads d_ff enc dec inputs_length batch
    "tiny": (128, 4, 512, 2, 2, 128, 16),
    "small": (512, 8, 2048, 6, 6, 512, 64),
    "base": (768, 12, 3072, 6, 6, 512, 256),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("mass")
    d_model, heads, d_ff, enc, dec, length, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_ff=d_ff, num_encoder_layers=enc,
                        num_decoder_layers=dec, max_position_embeddings=max(length, 1024)))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c, b2=0.98)
    if preset == "tiny":
        c.model.dropout_rate = 0.0
        presets.tiny_run(c, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=1e-4, warmup_steps=4000, num_steps=500_000)
    c.lock()
    return c
