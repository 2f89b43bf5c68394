"""CNN/DailyMail summarisation as T5 writes it: "summarize: <article>" -> the highlights.

The highlights keep their newlines between sentences, which rougeLsum reads as sentence ends.
ROUGE is scored as T5 scores it: no stemmer, bootstrap-aggregated (``metrics.rouge``).
"""

from __future__ import annotations

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import register_t2t_task

TFDS_NAME = "tfds:cnn_dailymail:3.4.0"
SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def register(vocabulary=None) -> None:
    """Registers cnn_dailymail (ROUGE-1/2/Lsum)."""
    register_t2t_task("cnn_dailymail", TFDS_NAME, inputs="summarize: {article}",
                      targets="{highlights}", keep=("id",), splits=SPLITS,
                      metric_fns=[metrics.rouge], vocabulary=vocabulary)
