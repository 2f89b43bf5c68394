"""XLNet: permutation language modelling with two-stream relative attention and memory.

    t5x-like train --config configs/xlnet_plm.py:tiny --workdir runs/xlnet_tiny
    t5x-like eval --checkpoint runs/xlnet_tiny

About 1/K of each segment's tokens (K = 6: 85 of 512) are predicted, the last of a random
factorisation order; ``--config.objective.span=True`` picks the reference's n-gram spans of
1..``max_span`` tokens instead of single ones. Memory: each layer's last ``model.mem_len``
states are carried, under stop-gradient, to the next batch, whose row i continues row i's
text for ``objective.consecutive_batches`` batches (families/xlnet.py);
``--config.model.mem_len=0`` turns recurrence off.

Presets: ``tiny`` (CPU minutes), ``small`` (6 x 512) and ``base`` (XLNet-base: 12 x 768,
12 heads, d_ff 3072, 512 tokens + 384 memory, dropout 0.1, AdamW with linear decay).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model heads d_ff layers inputs_length mem_len batch
    "tiny": (128, 4, 512, 2, 128, 64, 16),
    "small": (512, 8, 2048, 6, 512, 256, 64),
    "base": (768, 12, 3072, 12, 512, 384, 256),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("xlnet")
    d_model, heads, d_ff, layers, length, mem_len, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_ff=d_ff, num_layers=layers,
                        mem_len=mem_len))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c)
    if preset == "tiny":
        c.model.dropout_rate = 0.0
        presets.tiny_run(c, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=4e-4, warmup_steps=10_000, num_steps=500_000)
    c.lock()
    return c
