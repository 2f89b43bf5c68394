"""TinyBERT: a shallow, narrow student distilled layer by layer from a deeper BERT teacher
(embedding, hidden-state and attention-map MSE at uniformly mapped layers, then the
prediction layer's soft cross-entropy), on masked-LM rows of the default corpus.

    t5x-like train --config configs/bert_mlm_nsp.py:tiny --workdir runs/bert_tiny \\
        --config.objective.layout=full_sentences --config.model.nsp_head=False \\
        --config.model.pooler=False
    t5x-like train --config configs/tinybert.py:tiny --workdir runs/tinybert_tiny \\
        --config.objective.teacher=runs/bert_tiny
    t5x-like train --config configs/tinybert.py:tiny --workdir runs/tinybert_tiny_pred \\
        --config.objective.teacher=runs/bert_tiny --config.objective.stage=prediction \\
        --config.objective.init_student=runs/tinybert_tiny
    t5x-like eval --checkpoint runs/tinybert_tiny

The first run is TinyBERT's general distillation (``objective.stage=intermediate``); the second
continues the same student on the prediction layer alone. Presets (student layers / hidden /
heads / FFN, and the bert_mlm_nsp preset of its teacher): ``tiny`` 1/64/2/256 from ``tiny``
(2/128/2), ``small`` 2/128/4/512 from ``mini`` (4/256/4), ``base`` 4/312/12/1200 from ``base``
(TinyBERT-4 from BERT-base, the paper's) and ``base6`` 6/768/12/3072 from ``base`` (TinyBERT-6).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #         layers hidden heads ffn  teacher preset
    "tiny": (1, 64, 2, 256, "tiny"),
    "small": (2, 128, 4, 512, "mini"),
    "base": (4, 312, 12, 1200, "base"),
    "base6": (6, 768, 12, 3072, "base"),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("tinybert")
    layers, hidden, heads, ffn, teacher = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=ffn))
    long = teacher in ("base", "large")
    c.data.inputs_length = 512 if long else 128
    c.objective.max_predictions = 80 if long else 20
    c.objective.teacher = f"runs/bert_{teacher}"
    # TinyBERT's general distillation: Adam lr 1e-4 (5e-5 for task distillation), warmup 10%.
    presets.adamw(c, weight_decay=0.0)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=1e-4, warmup_steps=30_000,
                         num_steps=300_000)
    c.lock()
    return c
