"""Mixtures of registered tasks, with T5's examples-proportional rates.

The rate of task m with n_m training examples is ``min(n_m, cap) ** (1 / temperature)``,
normalised over the mixture (T = 1: examples-proportional; large T: close to equal). The
formula is seqio's own ``mixing_rate_num_examples``; this module only names its arguments.
Sizes are seqio's: the cached example count when the task is cached, else the source's
number of input examples (documents, not chunks).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import seqio

from t5x_like.data.registry import (  # noqa: F401  (re-exported: callers look names up here)
    get_provider,
    provider_names,
    unknown_name_error,
)
from t5x_like.errors import UserError


def register_mixture(name: str, tasks: Sequence[str], *, cap: int | None = None,
                     temperature: float = 1.0) -> seqio.Mixture:
    """Registers a mixture of ``tasks`` sampled at seqio's examples-proportional rates
    (sizes capped at ``cap``, then raised to 1/``temperature``); a name again replaces it."""
    if not tasks:
        raise UserError(f"mixture {name!r} needs at least one task")
    for task in tasks:
        if task not in seqio.TaskRegistry.names() and task not in seqio.MixtureRegistry.names():
            raise unknown_name_error(task, f"task (listed in mixture {name!r})")
    if name in seqio.TaskRegistry.names():
        raise UserError(f"{name!r} is already a task; pick another name for the mixture")
    if temperature <= 0:
        raise UserError(f"temperature of mixture {name!r} must be positive, got {temperature}")
    if cap is not None and cap <= 0:
        raise UserError(f"cap of mixture {name!r} must be positive or None, got {cap}")
    rate = functools.partial(seqio.mixing_rate_num_examples, maximum=cap,
                             temperature=temperature)
    seqio.MixtureRegistry.remove(name)
    try:
        return seqio.MixtureRegistry.add(name, list(tasks), default_rate=rate)
    except ValueError as e:  # e.g. tasks with different vocabularies or features
        raise UserError(f"cannot build mixture {name!r}: {e}") from None


def mixing_rates(name: str) -> dict[str, float]:
    """{task: share of the mixture's examples}, summing to 1."""
    mixture = seqio.MixtureRegistry.get(name) if name in seqio.MixtureRegistry.names() else None
    if mixture is None:
        raise unknown_name_error(name, "mixture")
    rates = {task.name: float(mixture.get_rate(task)) for task in mixture.tasks}
    total = sum(rates.values())
    return {task: rate / total for task, rate in rates.items()}
