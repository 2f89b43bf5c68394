"""WMT14 English-German as T5 writes it: "translate English to German: <en>" -> <de>.

Scored with sacrebleu's corpus BLEU (``metrics.bleu``); validation is newstest2013 and test
newstest2014, TFDS's splits of ``wmt14_translate/de-en``.
"""

from __future__ import annotations

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import register_t2t_task

TFDS_NAME = "tfds:wmt14_translate/de-en:1.0.0"
SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def register(vocabulary=None) -> None:
    """Registers wmt14_ende."""
    register_t2t_task("wmt14_ende", TFDS_NAME, inputs="translate English to German: {en}",
                      targets="{de}", splits=SPLITS, metric_fns=[metrics.bleu],
                      vocabulary=vocabulary)
