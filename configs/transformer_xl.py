"""Transformer-XL language model: segment recurrence + relative positions on continuing rows.

    t5x-like train --config configs/transformer_xl.py:tiny --workdir runs/txl_tiny
    t5x-like eval --checkpoint runs/txl_tiny   # loss, and perplexity with the memory
    t5x-like eval --checkpoint runs/txl_tiny --window 513 --stride 256

Each batch's row i continues row i's text for ``objective.consecutive_batches`` batches; each
layer's last ``model.mem_len`` input states are carried, under stop-gradient, as the next
segment's memory (families/transformer_xl.py). Presets: ``tiny`` (CPU minutes), ``small``
(the paper's enwik8/WT-103 base shape at 8 layers) and ``base`` (WikiText-103 base: 16 layers,
d 410, 10 heads of 41, d_ff 2100, 150 tokens a segment, memory 150, dropout 0.1, Adam 2.5e-4
with cosine decay, 200k steps, batch 60). The adaptive softmax of the paper's WT-103 runs is
not implemented: the full softmax over our 8k vocabulary is what it replaces.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model heads d_head d_ff layers length mem_len batch
    "tiny": (128, 4, 32, 512, 2, 64, 64, 16),
    "small": (256, 8, 32, 1024, 8, 128, 128, 32),
    "base": (410, 10, 41, 2100, 16, 150, 150, 60),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("transformer_xl")
    d_model, heads, d_head, d_ff, layers, length, mem_len, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_head=d_head, d_ff=d_ff,
                        num_layers=layers, mem_len=mem_len))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c, schedule="cosine", weight_decay=0.0, grad_clip_norm=0.25)
    if preset == "tiny":
        c.model.dropout_rate = 0.0
        presets.tiny_run(c, learning_rate=3e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=2.5e-4, warmup_steps=4000, num_steps=200_000)
    c.lock()
    return c
