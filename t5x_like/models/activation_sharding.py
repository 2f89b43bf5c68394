"""Sharding constraints on activations, named by logical axes, as T5X and MaxText pin them.

Weights carry their placement (``partitioning.py``); activations do not, and XLA's propagation
then picks their layout from the weights around them. Under pure fsdp (every weight's ``embed``
dim split over ``fsdp``) it may keep the hidden states split along ``embed`` and whole along
the batch, so every chip holds the whole batch's activations: terabytes per chip at pod scale.
Models call ``constrain(x, ("batch", "length", None))`` at the embedding output, layer
boundaries and logits; the step that traces them (``partitioning.with_activation_sharding``)
says how logical names map onto its mesh. Outside such a step (one device, decoding, tests of a
module) ``constrain`` returns its input unchanged, so the models need no mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

# The layouts models pin, by logical axis: hidden states and logits batch-first (the batch over
# data and fsdp under every preset), logits' vocab over tensor where the rules say so.
HIDDEN = ("batch", "length", None)
LOGITS = ("batch", "length", "vocab")
PER_TOKEN = ("batch", "length")  # one score per token (ELECTRA's discriminator)

# names, shape -> a Sharding for an array of that shape, or None to leave it to XLA
Resolver = Callable[[Sequence[str | None], tuple[int, ...]], jax.sharding.Sharding | None]

_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def resolving(resolver: Resolver | None) -> Iterator[None]:
    """While tracing a step, ``constrain`` asks ``resolver`` for each activation's sharding."""
    token = _RESOLVER.set(resolver)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` pinned to the layout its logical axis ``names`` (one per dim) have in the step
    being traced; unchanged when no step set the rules."""
    resolver = _RESOLVER.get()
    if resolver is None:
        return x
    sharding = resolver(tuple(names), tuple(x.shape))
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def step_devices() -> int:
    """How many devices the step being traced runs on; 1 outside a step. Layers whose plain
    form partitions badly (the embedding gather's scatter-add gradient) switch on it."""
    resolver = _RESOLVER.get()
    if resolver is None:
        return 1
    sharding = resolver((), ())
    return 1 if sharding is None else len(sharding.device_set)


def one_device_cpu_step() -> bool:
    """True when the step being traced runs on one XLA:CPU device: where the CPU-measured
    layouts (cpu_matmul's gradients, T5's two layers a scan trip) apply."""
    return jax.default_backend() == "cpu" and step_devices() == 1
