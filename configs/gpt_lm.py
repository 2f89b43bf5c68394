"""GPT-style decoder-only LM: next-token cross-entropy on packed chunks of the default corpus.

    t5x-like train --config configs/gpt_lm.py:tiny --workdir runs/gpt_tiny
    t5x-like eval --checkpoint runs/gpt_tiny --window 129 --stride 64   # sliding-window perplexity
    t5x-like infer --checkpoint runs/gpt_tiny --input "ROMEO: But soft"

Presets: ``tiny`` (CPU minutes), ``small`` (6 layers x 512) and ``base`` (GPT-2 small: 12 x 768,
12 heads, 1024 positions, tied embeddings, GELU-tanh, AdamW 6e-4 with cosine decay, b2 0.95,
weight decay 0.1, clipping 1.0, no z-loss). ``--config.model.position_embedding=rotary`` swaps
learned positions for RoPE; ``--config.model.tie_word_embeddings=False`` unties the head;
``--config.objective.document_mask=False`` lets attention cross document boundaries.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model heads d_ff layers inputs_length batch
    "tiny": (128, 4, 512, 2, 128, 16),
    "small": (512, 8, 2048, 6, 512, 64),
    "base": (768, 12, 3072, 12, 1024, 256),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("gpt")
    d_model, heads, d_ff, layers, length, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_kv=d_model // heads, d_ff=d_ff,
                        num_layers=layers, max_length=max(length, 1024)))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c, schedule="cosine", b2=0.95, eps=1e-8, weight_decay=0.1)  # GPT-2's
    if preset == "tiny":
        presets.tiny_run(c, learning_rate=3e-3, warmup_steps=100)
    else:
        c.model.dropout_rate = 0.1 if preset == "base" else 0.0
        presets.full_run(c, learning_rate=6e-4, warmup_steps=2000, num_steps=100_000)
    c.lock()
    return c
