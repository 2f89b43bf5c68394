"""Reformer: causal LM with LSH attention, reversible layers and a chunked feed-forward.

    t5x-like train --config configs/reformer.py:tiny --workdir runs/reformer_tiny
    t5x-like eval --checkpoint runs/reformer_tiny   # loss and sliding-window perplexity

Presets: ``tiny`` (CPU minutes: 2 layers x 128, 256 tokens, chunks of 32, 8 buckets, 2
hashes), ``small`` (6 x 256, 4,096 tokens, chunks of 64, 64 buckets, 2 hashes) and ``base``
(the paper's enwik8 shape at 12 layers: d 1024, 8 heads of 128, d_ff 4096, 16,384 tokens,
chunks of 64, 256 buckets, 4 hashes, Adafactor-free AdamW 1e-4). Training hashes with fresh
rotations each step; ``--config.model.reversible=False`` stores activations instead of
recomputing them (same numbers, more memory).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        hidden heads head_dim d_ff layers length chunk buckets hashes batch
    "tiny": (128, 2, 64, 512, 2, 256, 32, 8, 2, 8),
    "small": (256, 4, 64, 1024, 6, 4096, 64, 64, 2, 16),
    "base": (1024, 8, 128, 4096, 12, 16384, 64, 256, 4, 8),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("reformer")
    hidden, heads, head_dim, d_ff, layers, length, chunk, buckets, hashes, batch = SIZES[preset]
    c.model.update(dict(hidden_size=hidden, num_heads=heads, head_dim=head_dim,
                        feed_forward_size=d_ff, num_layers=layers, max_position_embeddings=length,
                        lsh_chunk_length=chunk, num_buckets=buckets, num_hashes=hashes,
                        chunk_size_feed_forward=min(length, 1024)))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c, weight_decay=0.0)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, chunk_size_feed_forward=64))
        presets.tiny_run(c, learning_rate=3e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=1e-4, warmup_steps=4000, num_steps=200_000)
    c.lock()
    return c
