"""Sequence classification (or regression) with a head on a pretrained BERT-style encoder.

    t5x-like train --config configs/bert_classify.py:tiny --workdir runs/bert_plays \
        --config.finetune.init_checkpoint=runs/bert_tiny
    t5x-like train --config configs/bert_classify.py:base --workdir runs/bert_sst2 \
        --config.finetune.init_checkpoint=runs/bert_base --config.data.task=glue_sst2 \
        --config.finetune.label_names="('negative','positive')"
    ... --config.finetune.mode=feature|adapters|lora|prompt|prefix|gradual|full
    ... --config.finetune.head=regression        # e.g. glue_stsb

Presets match ``bert_mlm_nsp.py`` (tiny/mini/small/medium/base/large). The head reads the
pooled [CLS] (``finetune.pooling='pooled'``, the NSP-pretrained pooler) or [CLS] itself.
Devlin et al.'s recipe: AdamW lr 2e-5..5e-5 (tiny: 1e-3), warmup 10%, linear decay, dropout
0.1. Default task: ``play_lines`` (which of five plays a speech comes from).
"""

from t5x_like import presets
from t5x_like.config import base_config
from t5x_like.tasks.play_lines import LABELS

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
    c = base_config("bert_finetune")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    c.data.task = "play_lines"
    c.data.inputs_length = 128
    c.finetune.head = "classification"
    c.finetune.label_names = LABELS
    presets.adamw(c)
    if preset == "tiny":
        # No dropout, as the tiny pretraining preset.
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=60, num_steps=600,
                         eval_every=200, checkpoint_every=200)
    else:
        presets.full_run(c, batch_size=32, learning_rate=2e-5, warmup_steps=1000,
                         num_steps=10_000, eval_every=1000, checkpoint_every=1000)
    c.data.pack = True  # several examples per row, as T5X fine-tunes (finetune.packing)
    c.lock()
    return c
