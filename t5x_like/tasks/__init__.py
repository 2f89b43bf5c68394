"""seqio tasks and mixtures; importing this package registers DEFAULT_TASK ("shakespeare") and
the fine-tuning benchmarks in T5's text-to-text format: glue_* (+ mixtures glue_proportional,
glue_temperature_2, glue_equal), super_glue_*, squad_v1, cnn_dailymail, wmt14_ende.

    register_text_task(name, "data/my.txt" | "data/folder" | "tfds:NAME/CONFIG:VERSION")
    register_t2t_task(name, "tfds:NAME/CONFIG:VERSION", inputs="prefix: {field}",
                      label_names=(...) | targets="{field}", metric_fns=[...])
    register_mixture(name, [task, ...], cap=K, temperature=T)
    list_tasks()  # what `t5x-like tasks` prints

Registering is cheap: the default vocabulary is trained (once, then cached) when a task's
data is first read, not on import.
"""

from __future__ import annotations

import seqio

from t5x_like.data import tf_runtime
from t5x_like.tasks import glue, ner, speech, squad, summarization, superglue, translation
from t5x_like.tasks.mixtures import get_provider, mixing_rates, register_mixture
from t5x_like.tasks.pretraining import (
    DEFAULT_TASK,
    SOURCES,
    register_default_task,
    register_text_task,
)
from t5x_like.tasks.text_to_text import register_t2t_task, tfds_size

__all__ = [
    "DEFAULT_TASK",
    "get_provider",
    "list_tasks",
    "mixing_rates",
    "register_mixture",
    "register_t2t_task",
    "register_text_task",
]

tf_runtime.configure()


def _splits(provider) -> list[str]:
    try:
        return sorted(provider.splits)
    except Exception:  # a TFDS dataset that is not downloaded cannot list its splits
        return []


def _tfds_sizes(task: seqio.Task) -> dict[str, int | str] | None:
    """{split: examples} from TFDS metadata, "n/a" where the dataset is not prepared (nothing
    is downloaded); None for tasks not read from TFDS."""
    if not isinstance(task.source, seqio.TfdsDataSource):
        return None
    sizes = {split: tfds_size(task, split) for split in _splits(task)}
    return {split: "n/a" if n is None else n for split, n in sizes.items()}


def _sizes_known(mixture: seqio.Mixture) -> bool:
    """Whether every TFDS task of the mixture knows its train size (else no rates to show)."""
    return all(tfds_size(t, "train") is not None for t in mixture.tasks
               if isinstance(t.source, seqio.TfdsDataSource))


def list_tasks() -> list[dict]:
    """One row per registered task and mixture: name, kind, splits (+ source, TFDS sizes or
    mixing rates; "n/a" where TFDS data is not prepared)."""
    rows = []
    for name in sorted(seqio.TaskRegistry.names()):
        task = seqio.TaskRegistry.get(name)
        row = {"name": name, "kind": "task", "splits": _splits(task)}
        if name in SOURCES:
            row["source"] = SOURCES[name]
        sizes = _tfds_sizes(task)
        if sizes is not None:
            row["sizes"] = sizes
        rows.append(row)
    for name in sorted(seqio.MixtureRegistry.names()):
        mixture = seqio.MixtureRegistry.get(name)
        row = {"name": name, "kind": "mixture", "splits": _splits(mixture)}
        if not _sizes_known(mixture):
            row["rates"] = "n/a"
            rows.append(row)
            continue
        try:
            row["rates"] = {t: round(r, 4) for t, r in mixing_rates(name).items()}
        except Exception as e:  # sizes unknown for another reason: still list it
            row["rates"] = f"unknown ({type(e).__name__})"
        rows.append(row)
    return rows


register_default_task()
glue.register()
superglue.register()
squad.register()
summarization.register()
translation.register()
speech.register()
ner.register()
