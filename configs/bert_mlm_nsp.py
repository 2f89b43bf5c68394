"""BERT pretrained with masked LM (15%, 80/10/10, MLM head at the selected slots only) + next
sentence prediction on ``[CLS] A [SEP] B [SEP]`` pairs built from the task's documents.

    t5x-like train --config configs/bert_mlm_nsp.py:tiny --workdir runs/bert_tiny
    t5x-like eval --checkpoint runs/bert_tiny      # MLM accuracy, nsp/accuracy
    t5x-like train --config configs/bert_mlm_nsp.py:base --workdir runs/bert_base \
        --config.data.task=my_corpus --config.objective.examples_per_document=0

Presets (layers / hidden / heads, FFN = 4 x hidden; the sizes of Turc et al.'s compact BERTs):
``tiny`` 2/128/2 (CPU minutes), ``mini`` 4/256/4, ``small`` 4/512/8, ``medium`` 8/512/8,
``base`` 12/768/12 and ``large`` 24/1024/16. ``tiny`` to ``medium`` train on 128 tokens with 20
predictions per row, ``base``/``large`` on 512 with 80. AdamW lr 1e-4, warmup 10k, linear decay,
weight decay 0.01, dropout 0.1 (``tiny``: lr 1e-3, no dropout). Whole-word masking:
``--config.objective.whole_word=True``; static masks: ``--config.objective.static_masking=True``.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("bert")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    long = preset in ("base", "large")
    c.data.inputs_length = 512 if long else 128
    c.objective.max_predictions = 80 if long else 20
    presets.adamw(c)  # BERT's: b2 0.999, eps 1e-6, weight decay 0.01, clipping 1.0
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                         num_steps=1_000_000)
    c.lock()
    return c
