"""A learned metric, BLEURT-style: a regression head on a BERT-style encoder that reads
``[CLS] reference [SEP] candidate [SEP]`` and predicts a quality score.

    # 1. pretrain on synthetic pairs of the default corpus (target: mean of BLEU and ROUGE)
    t5x-like train --config configs/learned_metric.py:tiny --workdir runs/metric_pre
    #    (optionally from a pretrained encoder: --config.finetune.init_checkpoint=runs/bert_tiny)
    # 2. fine-tune on human ratings (SICK relatedness, shipped; or your own TSV, below)
    t5x-like train --config configs/learned_metric.py:tiny_finetune --workdir runs/metric \
        --config.finetune.init_checkpoint=runs/metric_pre
    # 3. score predictions against references, beside BLEU and ROUGE
    t5x-like eval --metric learned:runs/metric --metric bleu --metric rouge \
        --references refs.txt --predictions preds.txt

Your own ratings: a TSV ``reference<TAB>candidate<TAB>score[<TAB>split]`` registered in a task
file (``register_ratings_task("my_ratings", "ratings.tsv", score_range=(0, 100))`` from
``t5x_like.tasks.ratings``), then ``--config.data.task_modules=t5x_like.tasks.ratings,my_tasks.py
--config.data.task=my_ratings``.

Presets: ``tiny``, ``small``, ``base`` pretrain on synthetic pairs, ``tiny_finetune``,
``small_finetune``, ``base_finetune`` fine-tune on ratings; sizes as ``bert_mlm_nsp.py``'s
(2/128/2: CPU minutes; 4/512/8; 12/768/12), so a BERT run of the same size initialises them.
The head reads [CLS] (``finetune.pooling='cls'``: no NSP-trained pooler is needed); one
averaged target (BLEURT uses several signals; here their mean, ``data.metric_pairs``).
AdamW with linear decay.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {  # bert_mlm_nsp.py's
    #          layers hidden heads
    "tiny": (2, 128, 2),
    "small": (4, 512, 8),
    "base": (12, 768, 12),
}
# SIZE pretrains on synthetic pairs; SIZE_finetune fine-tunes on human ratings.
PRESETS = {**{size: (*dims, "pretrain") for size, dims in SIZES.items()},
           **{f"{size}_finetune": (*dims, "finetune") for size, dims in SIZES.items()}}
TASKS = {"pretrain": "metric_pairs", "finetune": "sick_relatedness"}


def get_config(arg=None):
    preset = presets.choose(PRESETS, arg, default="tiny")
    layers, hidden, heads, stage = PRESETS[preset]
    c = base_config("bert_finetune")
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    c.data.task_modules = "t5x_like.tasks.ratings"
    c.data.task = TASKS[stage]
    c.data.inputs_length = 96  # [CLS] reference [SEP] candidate [SEP], each side <= 46 tokens
    c.finetune.head = "regression"
    c.finetune.pooling = "cls"
    c.finetune.targets_length = 12  # the score as text, e.g. "0.5684"
    presets.adamw(c)
    tiny = layers == 2
    if tiny:
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        steps = 1000 if stage == "pretrain" else 400
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3 if stage == "pretrain" else 5e-4,
                         warmup_steps=steps // 10, num_steps=steps, eval_every=steps // 2,
                         checkpoint_every=steps // 2)
    else:
        steps = 40_000 if stage == "pretrain" else 4_000
        presets.full_run(c, batch_size=32, learning_rate=1e-5, warmup_steps=steps // 10,
                         num_steps=steps, eval_every=steps // 10, checkpoint_every=steps // 10)
    c.lock()
    return c
