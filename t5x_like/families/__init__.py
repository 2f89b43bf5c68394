"""Families by name: where an objective, a module and a loss meet (T5X's BaseModel contract).

The trainer only ever calls a family's ``init``, ``loss_fn``, ``score_batch`` and
``predict_batch``; adding a family is a new file here plus one line in ``FAMILIES``.
"""

from __future__ import annotations

import ml_collections

from t5x_like.families.t5 import T5Family

FAMILIES = {"t5": T5Family}


def get_family(config: ml_collections.ConfigDict, vocab_size: int):
    """The family object for a resolved config."""
    return FAMILIES[config.family](config, vocab_size)
