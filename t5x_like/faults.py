"""Numerical faults: skip updates with a non-finite loss or gradient, count them, spot spikes.

Inside the jitted step (``finite`` and ``keep_if``): when the loss or the global gradient norm
is not finite, the new parameters and optimizer state are replaced by the old ones with a
select that XLA fuses into the update, so a bad batch never reaches the weights; the step
counter still advances, so the data stream and the keys move on exactly as in a healthy run.

On the host (``StepHealth``): per-step ``skipped`` flags and losses, read at each log step,
give the number of skipped updates, the current run of skips in a row (more than
``train.max_skipped_steps`` stops the run with a message naming the steps and batches) and
loss spikes (a loss above ``train.loss_spike_factor`` x the median of the last
``SPIKE_WINDOW`` healthy steps), which are logged, not acted on.

Fault injection for tests: ``T5X_LIKE_INJECT_NAN_STEPS="3,4,5"`` makes the gradients NaN at
those 0-based step indices (the step that consumes batch i has index i). It is read once when
the step is built; unset (always, outside tests), the step is traced without it.
"""

from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_like.errors import UserError

INJECT_NAN_ENV = "T5X_LIKE_INJECT_NAN_STEPS"
SPIKE_WINDOW = 100  # healthy losses the running median is taken over
SPIKE_MIN_HISTORY = 20  # no spike is called before this many healthy steps


def injected_nan_steps() -> tuple[int, ...]:
    """Step indices at which tests ask for NaN gradients (empty unless the env var is set)."""
    text = os.environ.get(INJECT_NAN_ENV, "").strip()
    if not text:
        return ()
    try:
        return tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise UserError(f"${INJECT_NAN_ENV}={text!r} must list step indices, e.g. 3,4") from None


def inject_nan(grads, step: jax.Array, steps: tuple[int, ...]):
    """``grads`` with every leaf NaN when ``step`` is one of ``steps`` (a test hook)."""
    hit = jnp.isin(step, jnp.asarray(steps, jnp.int32))
    return jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)


def finite(loss: jax.Array, grads) -> jax.Array:
    """True when the loss and every gradient are finite (one global-norm reduction)."""
    return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))


def keep_if(ok: jax.Array, new, old):
    """``new`` where ``ok``, else ``old``, leaf by leaf (both pytrees of the same structure)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class StepHealth:
    """Host-side bookkeeping of skipped updates and loss spikes over a run (or its resumption)."""

    def __init__(self, max_skipped_steps: int, spike_factor: float):
        self.max_skipped = max_skipped_steps
        self.spike_factor = spike_factor
        self.skipped_total = 0
        self.spikes = 0
        self.in_a_row = 0
        self.history: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)

    def observe(self, first_step: int, losses: np.ndarray, skipped: np.ndarray) -> list[str]:
        """Takes the per-step losses and skip flags of steps ``first_step, first_step+1, ...``
        (1-based step numbers, as logged); returns warning lines, raises UserError when more
        than ``max_skipped_steps`` updates in a row were skipped."""
        warnings = []
        for offset, (loss, skip) in enumerate(zip(losses, skipped, strict=True)):
            step = first_step + offset
            if skip:
                self.skipped_total += 1
                self.in_a_row += 1
                if self.in_a_row > self.max_skipped:
                    first = step - self.in_a_row + 1
                    raise UserError(
                        f"training stopped at step {step}: {self.in_a_row} updates in a row "
                        f"(steps {first}-{step}, training batches {first - 1}-{step - 1}) had a "
                        f"non-finite loss or gradient, more than train.max_skipped_steps="
                        f"{self.max_skipped}; the last checkpoint is intact: lower "
                        f"optimizer.learning_rate, set optimizer.grad_clip_norm or check the "
                        f"data, then resume"
                    )
                continue
            self.in_a_row = 0
            loss = float(loss)
            if self.spike_factor and len(self.history) >= SPIKE_MIN_HISTORY:
                median = float(np.median(self.history))
                if loss > self.spike_factor * median:
                    self.spikes += 1
                    warnings.append(
                        f"warning: loss spike at step {step}: {loss:.4f} is more than "
                        f"{self.spike_factor:g} x the median {median:.4f} of the last "
                        f"{len(self.history)} steps"
                    )
            self.history.append(loss)
        return warnings
