"""seqio tasks and mixtures; importing this package registers DEFAULT_TASK ("shakespeare").

    register_text_task(name, "data/my.txt" | "data/folder" | "tfds:NAME/CONFIG:VERSION")
    register_mixture(name, [task, ...], cap=K, temperature=T)
    list_tasks()  # what `t5x-like tasks` prints

Registering is cheap: the default vocabulary is trained (once, then cached) when a task's
data is first read, not on import.
"""

from __future__ import annotations

import seqio

from t5x_like.data import tf_runtime
from t5x_like.tasks.mixtures import get_provider, mixing_rates, register_mixture
from t5x_like.tasks.pretraining import (
    DEFAULT_TASK,
    SOURCES,
    register_default_task,
    register_text_task,
)

__all__ = [
    "DEFAULT_TASK",
    "get_provider",
    "list_tasks",
    "mixing_rates",
    "register_mixture",
    "register_text_task",
]

tf_runtime.configure()


def _splits(provider) -> list[str]:
    try:
        return sorted(provider.splits)
    except Exception:  # a TFDS dataset that is not downloaded cannot list its splits
        return []


def list_tasks() -> list[dict]:
    """One row per registered task and mixture: name, kind, splits (+ source or rates)."""
    rows = []
    for name in sorted(seqio.TaskRegistry.names()):
        row = {"name": name, "kind": "task", "splits": _splits(seqio.TaskRegistry.get(name))}
        if name in SOURCES:
            row["source"] = SOURCES[name]
        rows.append(row)
    for name in sorted(seqio.MixtureRegistry.names()):
        row = {"name": name, "kind": "mixture", "splits": _splits(seqio.MixtureRegistry.get(name))}
        try:
            row["rates"] = {t: round(r, 4) for t, r in mixing_rates(name).items()}
        except Exception as e:  # sizes unknown (e.g. TFDS data not prepared): still list it
            row["rates"] = f"unknown ({type(e).__name__})"
        rows.append(row)
    return rows


register_default_task()
