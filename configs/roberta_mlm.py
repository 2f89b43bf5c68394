"""RoBERTa: masked LM only (no NSP) on FULL-SENTENCES rows ``<s> ... </s>`` packed across
documents, a fresh mask every step (dynamic masking), Adam beta2 0.98 / eps 1e-6.

    t5x-like train --config configs/roberta_mlm.py:tiny --workdir runs/roberta_tiny
    t5x-like eval --checkpoint runs/roberta_tiny   # MLM accuracy

Presets: ``tiny`` (2 x 128, CPU minutes), ``small`` (4 x 512, 8 heads) and ``base`` (12 x 768,
12 heads, 512 tokens, batch 8k, peak lr 6e-4, warmup 24k, linear decay, weight decay 0.01,
dropout 0.1). Positions start at 2 as in RoBERTa (``model.position_offset``), so
``max_position_embeddings`` is the length + 2. The paper's byte-level BPE is an HF tokenizer
away (``data.vocab_path``); the default corpus vocabulary is used here.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length batch
    "tiny": (2, 128, 2, 128, 32),
    "small": (4, 512, 8, 128, 256),
    "base": (12, 768, 12, 512, 8192),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("roberta")
    layers, hidden, heads, length, batch = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=length + 2))
    c.data.inputs_length = length
    c.data.batch_size = batch
    c.objective.max_predictions = 80 if length == 512 else 20
    presets.adamw(c, b2=0.98, grad_clip_norm=0.0)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=6e-4 if preset == "base" else 1e-4,
                         warmup_steps=24_000 if preset == "base" else 10_000, num_steps=500_000)
    c.lock()
    return c
