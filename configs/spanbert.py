"""SpanBERT: whole-word spans of Geometric(0.2) length (at most 10 words, mean 3.8) within a 15%
budget, 80/10/10 per span, masked LM + the span-boundary objective (each span token predicted
from the two encodings just outside its span and its offset in the span), single segments,
no NSP.

    t5x-like train --config configs/spanbert.py:tiny --workdir runs/spanbert_tiny
    t5x-like eval --checkpoint runs/spanbert_tiny  # MLM accuracy, sbo/accuracy

Presets: ``tiny`` (2 x 128, CPU minutes), ``small`` (4 x 512, 8 heads) and ``base`` (BERT-base
size, 512 tokens, 80 predictions, AdamW lr 1e-4, warmup 10k, linear decay, weight decay 0.01,
dropout 0.1). The SBO offset table has 32 rows (``model.sbo_max_span_length``): a 10-word span
may hold more than 10 pieces; longer offsets share the last row.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length
    "tiny": (2, 128, 2, 128),
    "small": (4, 512, 8, 128),
    "base": (12, 768, 12, 512),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("spanbert")
    layers, hidden, heads, length = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    c.data.inputs_length = length
    c.objective.max_predictions = 80 if length == 512 else 20
    presets.adamw(c)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                         num_steps=2_400_000 if preset == "base" else 1_000_000)
    c.lock()
    return c
