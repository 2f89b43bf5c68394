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
    preset = arg or "base"
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(SIZES)}")
    c = base_config("bert")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    long = preset in ("base", "large")
    c.data.inputs_length = 512 if long else 128
    c.objective.max_predictions = 80 if long else 20
    c.loss.z_loss = 0.0
    c.optimizer.update(dict(name="adamw", schedule="linear", b1=0.9, b2=0.999, eps=1e-6,
                            weight_decay=0.01, grad_clip_norm=1.0))
    if preset == "tiny":
        c.model.update(dict(scan_layers=False, hidden_dropout_rate=0.0,
                            attention_dropout_rate=0.0))
        c.data.batch_size = 32
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 100
        c.train.update(dict(num_steps=1000, log_every=25, eval_every=500, eval_batches=8,
                            checkpoint_every=250))
    else:
        c.data.batch_size = 256
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 10_000
        c.train.update(dict(num_steps=1_000_000, log_every=100, eval_every=5000,
                            checkpoint_every=5000))
    c.lock()
    return c
