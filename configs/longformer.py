"""Longformer: RoBERTa's MLM on long rows with sliding-window attention (+ global tokens).

    t5x-like train --config configs/longformer.py:tiny --workdir runs/longformer_tiny
    t5x-like eval --checkpoint runs/longformer_tiny   # MLM accuracy

The paper's recipe (``base``): start from RoBERTa-base and extend it to 4,096 positions by
copying its 512 learned position embeddings eight times, then continue MLM pretraining with a
window of 512 (256 each side)::

    python -c "from t5x_like.interop.hf_longformer import longformer_from_roberta as f; \\
               f('roberta-base/', 'longformer-from-roberta/', max_positions=4096)"
    t5x-like import-hf longformer-from-roberta/ runs/longformer_base
    t5x-like train --config configs/longformer.py:base --workdir runs/longformer_base

``import-hf`` writes an ordinary run at step 0 that ``train`` continues; the model fields
(vocabulary size, widths) must be the imported model's and ``data.vocab_path`` its tokenizer
(RoBERTa's BPE); the conversion itself is tested against transformers, the continued run at
base size is not. Presets: ``tiny`` (2 x 128, 512 tokens, window 32; CPU minutes), ``small``
(4 x 512, 2,048 tokens, window 256) and ``base`` (12 x 768, 4,096 tokens, window 512, peak lr
3e-5, warmup 500, 65k steps, batch 64 as the paper's continued pretraining).
``--config.model.attention_dilation=2`` dilates the window; ``model.max_global_tokens`` sets
the global slots a jitted call has.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length window batch
    "tiny": (2, 128, 2, 512, 32, 8),
    "small": (4, 512, 8, 2048, 256, 64),
    "base": (12, 768, 12, 4096, 512, 64),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("longformer")
    layers, hidden, heads, length, window, batch = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=length + 2,
                        attention_window=window))
    c.data.inputs_length = length
    c.data.batch_size = batch
    c.objective.max_predictions = 0  # ceil(0.15 * length)
    presets.adamw(c, b2=0.98, grad_clip_norm=0.0)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=3e-5 if preset == "base" else 1e-4,
                         warmup_steps=500, num_steps=65_000)
    c.lock()
    return c
