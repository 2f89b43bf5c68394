"""Which prepared stores a task or mixture reads (``data.store``), at which rates.

A task reads ``DIR/<task>/<split>``; a mixture reads each of its tasks' stores and samples
them at the mixture's own seqio rates (``mixtures.mixing_rates``), the rates its streaming
path uses. Stores are opened and checked (presence, sizes, vocabulary, checksums) once per
process, before anything compiles.
"""

from __future__ import annotations

import seqio

from t5x_like.data.store import StoreSplit, open_task_stores
from t5x_like.tasks.mixtures import get_provider, mixing_rates

_OPENED: dict[tuple, tuple[list[StoreSplit], list[float] | None]] = {}


def task_stores(root: str, name: str, split: str, vocabulary, *, verify: bool = True
                ) -> tuple[list[StoreSplit], list[float] | None]:
    """(store splits, mixing rates or None for one task) of task or mixture ``name``."""
    key = (str(root), name, split, verify, id(vocabulary))
    if key not in _OPENED:
        provider = get_provider(name)
        if isinstance(provider, seqio.Mixture):
            rates = mixing_rates(name)
            names = [task.name for task in provider.tasks if split in task.splits]
            weights = [rates[n] for n in names]
        else:
            names, weights = [name], None
        _OPENED[key] = (open_task_stores(root, names, split, vocabulary, verify), weights)
    return _OPENED[key]
