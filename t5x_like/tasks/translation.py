"""WMT as T5 writes it: "translate English to German: <en>" -> <de>, scored with sacrebleu's
corpus BLEU (``metrics.bleu``, T5's settings).

T5's WMT tasks, on TFDS's splits of each dataset: ``wmt14_ende`` (validation newstest2013, test
newstest2014), ``wmt14_enfr``, ``wmt15_enfr``, ``wmt16_enro``, ``wmt19_ende`` and
``wmt_t2t_ende`` (the Tensor2Tensor en-de data the T5 paper reports).
"""

from __future__ import annotations

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import register_t2t_task

SPLITS = {"train": "train", "validation": "validation", "test": "test"}
LANGUAGES = {"de": "German", "fr": "French", "ro": "Romanian"}  # babel's English names
# task: (TFDS dataset, target language); the source is always English
TASKS = {
    "wmt14_ende": ("wmt14_translate/de-en:1.0.0", "de"),
    "wmt14_enfr": ("wmt14_translate/fr-en:1.0.0", "fr"),
    "wmt15_enfr": ("wmt15_translate/fr-en:1.0.0", "fr"),
    "wmt16_enro": ("wmt16_translate/ro-en:1.0.0", "ro"),
    "wmt19_ende": ("wmt19_translate/de-en:1.0.0", "de"),
    "wmt_t2t_ende": ("wmt_t2t_translate/de-en:1.0.0", "de"),
}


def register(vocabulary=None) -> None:
    """Registers the WMT tasks (English to German, French, Romanian)."""
    for name, (dataset, target) in TASKS.items():
        register_t2t_task(name, f"tfds:{dataset}",
                          inputs=f"translate English to {LANGUAGES[target]}: {{en}}",
                          targets=f"{{{target}}}", splits=SPLITS, metric_fns=[metrics.bleu],
                          vocabulary=vocabulary)
