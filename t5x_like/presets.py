"""What the preset config files (``configs/*.py``) share, so each file holds only its recipe.

A config file is loaded as a standalone file (``--config configs/x.py:preset``), so what the
files have in common lives here, in the installed package. The recipe numbers (sizes, learning
rates, warm-up, step counts, masking budgets) stay in the config files; these helpers only set
what every preset of that kind sets the same way: the lookup of a preset name, the AdamW block
of the BERT-era recipes and the logging/evaluation/checkpoint cadence of a tiny CPU run and of
a full-size one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

# A tiny preset trains in CPU minutes: log often, evaluate at the half-way point and the end.
TINY_TRAIN = dict(num_steps=1000, log_every=25, eval_every=500, eval_batches=8,
                  checkpoint_every=250)
# A full-size run is long: log, evaluate and checkpoint less often (eval_batches: the default).
# 10 steps a compiled call: on CPU each call allocates the step's temporaries afresh, a cost
# that k steps a call share (t5_peers config, one process: 2368 ms a step at k=1, 2001 at 4;
# 8 and 16 were 2.0% and 4.6% faster than 4); on accelerators it saves host dispatches. The
# log, eval and checkpoint cadences are multiples of it, so no call is cut short; SIGTERM
# waits for the call in flight (10 steps, ~16 s for T5 small on a 2-core CPU).
FULL_TRAIN = dict(log_every=100, eval_every=5000, checkpoint_every=5000, steps_per_call=10)

# The BERT-era optimizer: AdamW with linear decay (learning rate and warm-up: the recipe's).
BERT_ADAMW = dict(name="adamw", schedule="linear", b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
                  grad_clip_norm=1.0)


def choose(sizes: Mapping[str, Any], arg: str | None, default: str) -> str:
    """The preset ``arg`` names (``default`` for none); an unknown name lists the known ones,
    so a typo on the command line is one sentence rather than a KeyError."""
    preset = arg or default
    if preset not in sizes:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(sizes)}")
    return preset


def adamw(c: ml_collections.ConfigDict, **changes: Any) -> None:
    """Switches ``c`` from T5's Adafactor (rsqrt, z-loss) to the BERT-era optimizer.

    That is AdamW with linear decay, b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01, gradient
    clipping 1.0 and no z-loss; ``changes`` are where a recipe departs from it (RoBERTa's
    ``b2=0.98``, GPT-2's ``schedule="cosine"``, ...).
    """
    c.loss.z_loss = 0.0
    c.optimizer.update({**BERT_ADAMW, **changes})


def _set_run(c: ml_collections.ConfigDict, batch_size: int | None, learning_rate: float | None,
             warmup_steps: int | None, train: dict[str, Any]) -> None:
    if batch_size is not None:
        c.data.batch_size = batch_size
    if learning_rate is not None:
        c.optimizer.learning_rate = learning_rate
    if warmup_steps is not None:
        c.optimizer.warmup_steps = warmup_steps
    c.train.update(train)


def tiny_run(c: ml_collections.ConfigDict, *, batch_size: int | None = None,
             learning_rate: float | None = None, warmup_steps: int | None = None,
             **train: Any) -> None:
    """A tiny preset's run: unrolled layers (on CPU a scanned stack is ~20% slower per step and
    unrolling keeps the compile short), ``TINY_TRAIN``'s cadence with ``train`` changes, and
    the given batch size and learning-rate schedule (None keeps the value already set)."""
    c.model.scan_layers = False
    _set_run(c, batch_size, learning_rate, warmup_steps, {**TINY_TRAIN, **train})


def full_run(c: ml_collections.ConfigDict, *, num_steps: int, batch_size: int | None = None,
             learning_rate: float | None = None, warmup_steps: int | None = None,
             **train: Any) -> None:
    """A full-size preset's run: ``num_steps`` at ``FULL_TRAIN``'s cadence with ``train``
    changes, and the given batch size and learning-rate schedule (None keeps the value set)."""
    _set_run(c, batch_size, learning_rate, warmup_steps,
             {"num_steps": num_steps, **FULL_TRAIN, **train})
