"""ALBERT: n-gram masked LM (n <= 3 whole words, p(n) ~ 1/n) + sentence-order prediction
(two consecutive segments, swapped with p = 0.5), factorised embeddings (E = 128) and one
transformer layer shared by every depth.

    t5x-like train --config configs/albert_sop.py:tiny --workdir runs/albert_tiny
    t5x-like eval --checkpoint runs/albert_tiny    # MLM accuracy, sop/accuracy

Presets: ``tiny`` (2 x 128, CPU minutes), ``small`` (6 x 512, 8 heads) and ``base`` (12 x 768,
12 heads, E 128, all layers shared: ~12M parameters with a 30k vocabulary; 512 tokens, 80
predictions, no dropout, GELU-tanh). Sharing by config: ``model.layer_sharing`` = all |
attention | ffn | groups (+ ``num_layer_groups``) | none. ALBERT trains with LAMB (lr 0.00176
at batch 4096), which is not among ``optimizer.name``; these presets use AdamW (lr 1e-4 at
batch 256, warmup 10k, linear decay, weight decay 0.01).
"""

from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length
    "tiny": (2, 128, 2, 128),
    "small": (6, 512, 8, 128),
    "base": (12, 768, 12, 512),
}


def get_config(arg=None):
    preset = arg or "base"
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(SIZES)}")
    c = base_config("albert")
    layers, hidden, heads, length = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden, embedding_size=128))
    c.data.inputs_length = length
    c.objective.max_predictions = 80 if length == 512 else 20
    c.loss.z_loss = 0.0
    c.optimizer.update(dict(name="adamw", schedule="linear", b1=0.9, b2=0.999, eps=1e-6,
                            weight_decay=0.01, grad_clip_norm=1.0))
    if preset == "tiny":
        c.model.scan_layers = False
        c.data.batch_size = 32
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 100
        c.train.update(dict(num_steps=1000, log_every=25, eval_every=500, eval_batches=8,
                            checkpoint_every=250))
    else:
        c.data.batch_size = 256
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 10_000
        c.train.update(dict(num_steps=125_000, log_every=100, eval_every=5000,
                            checkpoint_every=5000))
    c.lock()
    return c
