"""Evaluation over a split, shared by the training loop and the eval driver.

``device_batches`` turns a family's host batches into global arrays (each host reads its
own shard); ``make_eval_step`` / ``evaluate`` sum a family's loss metrics over a split with
masks from ``fold_in(seed key, EVAL_KEY_SALT)``, so a score never depends on the step it was
taken at. It lives below ``train.py`` so that evaluation does not import the trainer.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp

from t5x_like import distributed, partitioning
from t5x_like.errors import UserError
from t5x_like.experiment import Experiment

EVAL_KEY_SALT = 0x5EED  # folded into the seed key so evaluation masks never depend on the step


def make_eval_step(exp: Experiment):
    """A jitted ``(params, batch, key, carry) -> summed metrics`` (with ``'carry'``, the
    next batch's, when the family has one)."""
    family = exp.family

    def eval_step(params: dict, batch: dict, key: jax.Array, carry: dict | None):
        features = family.features(batch, key)
        if carry is not None:
            features["carry"] = carry
        _, sums = family.loss_fn(params, features, key, train=False)
        return sums

    carry_sharding = exp.state_shardings.get("carry")
    rules = partitioning.rules_from_config(exp.config.mesh)  # activations' layout too
    return jax.jit(
        partitioning.with_activation_sharding(eval_step, exp.mesh, rules),
        in_shardings=(exp.state_shardings["params"], exp.batch_sharding, None, carry_sharding),
    )


# --------------------------------------------------------------------------- batches


def device_batches(
    exp: Experiment, *, split: str, skip_batches: int = 0, repeat: bool = True, shuffle: bool = True
) -> Iterator[dict]:
    """Global batches of raw chunks, each host reading only its own shard of the stream."""
    processes = jax.process_count()
    stream = exp.family.batches(
        split=split,
        batch_size=exp.config.data.batch_size // processes,
        shuffle=shuffle,
        repeat=repeat,
        skip_batches=skip_batches,
        shard_index=jax.process_index(),
        num_shards=processes,
    )
    if not repeat:  # hosts' shards of a finite split end at different batches: stop together
        stream = distributed.until_any_exhausted(stream)
    for local in stream:
        yield jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(exp.batch_sharding, x), local
        )


def evaluate(
    exp: Experiment,
    params: dict,
    *,
    split: str | None = None,
    num_batches: int | None = None,
    eval_step=None,
) -> dict[str, float]:
    """Mean metrics (loss, token accuracy, ...) over the first ``num_batches`` of a split (0 = all).

    Pass the ``eval_step`` from ``make_eval_step`` when evaluating repeatedly, so it compiles once.
    """
    split = split or exp.config.data.eval_split
    num_batches = exp.config.train.eval_batches if num_batches is None else num_batches
    eval_step = eval_step or make_eval_step(exp)
    key = jax.random.fold_in(exp.root_key, EVAL_KEY_SALT)
    totals, carry = None, exp.initial_carry()
    for i, batch in enumerate(device_batches(exp, split=split, repeat=False, shuffle=False)):
        if num_batches and i >= num_batches:
            break
        sums = eval_step(params, batch, jax.random.fold_in(key, i), carry)
        carry = sums.pop("carry", None)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise UserError(
            f"split {split!r} of task {exp.config.data.task!r} gave no batch to evaluate"
        )
    totals = jax.device_get(totals)
    scores = {k: float(v) for k, v in exp.family.summarize(totals).items()}
    # The reported loss is the cross-entropy: the z-loss is a regulariser, not a model score.
    # (A Python float: numpy's float32 from ``max`` would not go into the JSON-lines log.)
    scores["loss"] = scores.pop("cross_entropy",
                                float(totals["loss"]) / max(float(totals["weight"]), 1.0))
    return {**scores, "tokens": int(totals["weight"])}
