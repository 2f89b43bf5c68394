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

Task-specific distillation (``:task_tiny``, ``:task_base``; family ``tinybert_task``): a
fine-tuned BERT teacher distils into the general-distilled student on a classification task,
first the intermediate layers, then the prediction layer:

    t5x-like train --config configs/bert_classify.py:tiny --workdir runs/bert_plays_tiny \\
        --config.finetune.init_checkpoint=runs/bert_tiny --config.model.pooler=False \\
        --config.finetune.pooling=cls
    t5x-like train --config configs/tinybert.py:task_tiny --workdir runs/tinybert_plays_inter \\
        --config.objective.teacher=runs/bert_plays_tiny \\
        --config.finetune.init_checkpoint=runs/tinybert_tiny
    t5x-like train --config configs/tinybert.py:task_tiny --workdir runs/tinybert_plays \\
        --config.objective.teacher=runs/bert_plays_tiny --config.objective.stage=prediction \\
        --config.finetune.init_checkpoint=runs/tinybert_plays_inter
    t5x-like eval --checkpoint runs/tinybert_plays --no-baseline   # accuracy, teacher/accuracy
"""

from t5x_like import presets
from t5x_like.config import base_config
from t5x_like.tasks.play_lines import LABELS

SIZES = {
    #         layers hidden heads ffn  teacher preset
    "tiny": (1, 64, 2, 256, "tiny"),
    "small": (2, 128, 4, 512, "mini"),
    "base": (4, 312, 12, 1200, "base"),
    "base6": (6, 768, 12, 3072, "base"),
}

TASK = {"task_tiny": "tiny", "task_base": "base"}  # task distillation: the student's size


def get_config(arg=None):
    preset = presets.choose({**SIZES, **TASK}, arg, default="base")
    if preset in TASK:
        return _task_config(TASK[preset])
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


def _task_config(size: str):
    """Task-specific distillation on ``play_lines`` (as configs/bert_classify.py): the student
    is ``size``'s, its teacher a bert_classify run of the teacher preset, both reading [CLS]
    (the general-distilled student has no pooler)."""
    c = base_config("tinybert_task")
    layers, hidden, heads, ffn, teacher = SIZES[size]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=ffn, pooler=False))
    c.data.task = "play_lines"
    c.data.inputs_length = 128
    c.data.pack = True
    c.finetune.update(dict(head="classification", label_names=LABELS, pooling="cls",
                           init_checkpoint=f"runs/tinybert_{size}"))
    c.objective.teacher = f"runs/bert_plays_{teacher}"
    # The paper's task distillation: batch 32, lr 5e-5 (intermediate; the prediction step
    # picks from 1e-5..3e-5), 20 epochs of intermediate and 3 of prediction-layer distillation.
    presets.adamw(c, weight_decay=0.0)
    if size == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=60, num_steps=600,
                         eval_every=200, checkpoint_every=200)
    else:
        presets.full_run(c, batch_size=32, learning_rate=5e-5, warmup_steps=1000,
                         num_steps=10_000, eval_every=1000, checkpoint_every=1000)
    c.lock()
    return c
