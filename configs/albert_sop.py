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

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length
    "tiny": (2, 128, 2, 128),
    "small": (6, 512, 8, 128),
    "base": (12, 768, 12, 512),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("albert")
    layers, hidden, heads, length = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden, embedding_size=128))
    c.data.inputs_length = length
    c.objective.max_predictions = 80 if length == 512 else 20
    presets.adamw(c)
    if preset == "tiny":
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                         num_steps=125_000)
    c.lock()
    return c
