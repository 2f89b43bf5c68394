"""The training loop. It knows no model family: it calls ``family.features`` and ``loss_fn``.

Resume order (every run, fresh or not):
  1. build the experiment from the config (vocabulary, family, mesh, shardings, optimizer);
  2. restore the newest readable checkpoint in WORKDIR/checkpoints, else initialise;
  3. reopen the data stream and skip the batches the checkpoint says were consumed;
  4. step from ``state['step']`` to ``train.num_steps`` with key = fold_in(seed key, step),
     so masks, dropout and data are the same as in a run that never stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers

from t5x_like.checkpoints import Checkpoints
from t5x_like.errors import UserError
from t5x_like.experiment import Experiment, build
from t5x_like.families.base import summarize

EVAL_KEY_SALT = 0x5EED  # folded into the seed key so evaluation masks never depend on the step


# --------------------------------------------------------------------------- step functions


def accumulate_gradients(family, params: dict, features: dict, key: jax.Array, accum: int):
    """(summed gradients, summed metrics) over ``accum`` equal micro-batches of ``features``.

    Sums, not means: divided once by the total weight, they equal the whole batch's gradient
    whatever the split. Micro-batch i gets dropout key ``fold_in(key, i)``.
    """
    grad_fn = jax.grad(family.loss_fn, has_aux=True)
    if accum == 1:
        return grad_fn(params, features, key)
    micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), features)

    def add_micro(carry, inputs):
        index, mb = inputs
        g, s = grad_fn(params, mb, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (g, s)), None

    zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (grads, sums), _ = jax.lax.scan(add_micro, zeros, (jnp.arange(accum), micro))
    return grads, sums


def make_train_step(exp: Experiment):
    """A jitted ``(state, batch) -> (state, metrics)`` with donated state."""
    family, tx, schedule = exp.family, exp.tx, exp.schedule
    accum = exp.config.optimizer.grad_accum_steps

    def train_step(state: dict, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        noise_key, dropout_key = jax.random.split(key)
        # The objective runs on the whole batch first, so micro-batching changes no mask.
        features = family.features(batch, noise_key)
        params = state["params"]
        grads, sums = accumulate_gradients(family, params, features, dropout_key, accum)
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            **summarize(sums),
            "loss": sums["loss"] / weight,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    repl = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(exp.state_shardings, exp.batch_sharding),
        out_shardings=(exp.state_shardings, repl),
        donate_argnums=0,
    )


def make_eval_step(exp: Experiment):
    """A jitted ``(params, batch) -> summed metrics`` with a fixed corruption key."""
    family = exp.family

    def eval_step(params: dict, batch: dict, key: jax.Array):
        features = family.features(batch, key)
        _, sums = family.loss_fn(params, features, key, train=False)
        return sums

    return jax.jit(
        eval_step, in_shardings=(exp.state_shardings["params"], exp.batch_sharding, None)
    )


# --------------------------------------------------------------------------- data


def device_batches(
    exp: Experiment, *, split: str, skip_batches: int = 0, repeat: bool = True, shuffle: bool = True
) -> Iterator[dict]:
    """Global batches of raw chunks, each host reading only its own shard of the stream."""
    processes = jax.process_count()
    for local in exp.family.batches(
        split=split,
        batch_size=exp.config.data.batch_size // processes,
        shuffle=shuffle,
        repeat=repeat,
        skip_batches=skip_batches,
        shard_index=jax.process_index(),
        num_shards=processes,
    ):
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
    totals = None
    for i, batch in enumerate(device_batches(exp, split=split, repeat=False, shuffle=False)):
        if num_batches and i >= num_batches:
            break
        sums = eval_step(params, batch, jax.random.fold_in(key, i))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise UserError(
            f"split {split!r} of task {exp.config.data.task!r} gave no batch to evaluate"
        )
    totals = jax.device_get(totals)
    scores = {k: float(v) for k, v in summarize(totals).items()}
    # The reported loss is the cross-entropy: the z-loss is a regulariser, not a model score.
    scores["loss"] = scores.pop("cross_entropy", float(totals["loss"]) / max(totals["weight"], 1))
    return {**scores, "tokens": int(totals["weight"])}


# --------------------------------------------------------------------------- the loop


class MetricsLog:
    """TensorBoard (via clu) plus a JSON-lines file, written by process 0 only."""

    def __init__(self, workdir: Path):
        self.primary = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            str(workdir / "tensorboard"), just_logging=not self.primary
        )
        self.jsonl = open(workdir / "metrics.jsonl", "a") if self.primary else None  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.jsonl:
            self.jsonl.close()


def train(config: ml_collections.ConfigDict, workdir: str | Path, devices=None) -> dict:
    """Trains (or resumes) to ``train.num_steps``; returns the last logged and eval metrics."""
    workdir = Path(workdir)
    # 1. experiment
    exp = build(config, devices)
    cfg = exp.config
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        exp.write_config(workdir)
    # 2. state
    checkpoints = Checkpoints(workdir, keep=cfg.train.keep_checkpoints)
    state, meta = exp.restore_or_init(checkpoints)
    start = int(jax.device_get(state["step"]))
    if start:
        print(f"resumed from step {start} in {workdir}", flush=True)
    # 3. data
    batches = device_batches(exp, split="train", skip_batches=int(meta["batches_consumed"]))
    # 4. steps
    train_step = make_train_step(exp)
    eval_step = make_eval_step(exp)
    log = MetricsLog(workdir)
    tokens_per_batch = cfg.data.batch_size * exp.family.raw_length
    pending: list[dict] = []
    result: dict[str, float] = {}
    progress = _progress(cfg, start)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, cfg.train.num_steps):
            state, metrics = train_step(state, next(batches))
            pending.append(metrics)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
                scalars = {
                    f"train/{k}": float(np.mean(v))
                    for k, v in jax.device_get(_stack(pending)).items()
                }
                pending.clear()
                if not np.isfinite(scalars["train/loss"]):
                    raise UserError(
                        f"the training loss became non-finite by step {done}; the last checkpoint "
                        f"is intact: lower optimizer.learning_rate or enable "
                        f"optimizer.grad_clip_norm and resume"
                    )
                now = time.perf_counter()
                scalars["train/tokens_per_s"] = tokens_per_batch * (done - tick_step) / (now - tick)
                tick, tick_step = now, done
                log.write(done, scalars)
                result.update(scalars)
                progress.set_postfix(
                    loss=f"{scalars['train/loss']:.3f}",
                    tok_s=f"{scalars['train/tokens_per_s']:.0f}",
                )
            progress.update(1)
            if cfg.train.eval_batches and (
                done % cfg.train.eval_every == 0 or done == cfg.train.num_steps
            ):
                scores = evaluate(exp, state["params"], eval_step=eval_step)
                scalars = {f"eval/{k}": v for k, v in scores.items()}
                log.write(done, scalars)
                result.update(scalars)
                progress.write(
                    f"step {done}: eval loss {scores['loss']:.4f} accuracy {scores['accuracy']:.4f}"
                )
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.num_steps:
                checkpoints.save(
                    done, state, {"batches_consumed": done, "step": done, "config": cfg.to_dict()}
                )
    finally:
        progress.close()
        checkpoints.close()
        log.close()
    result["step"] = int(jax.device_get(state["step"]))
    return result


def _stack(items: list[dict]) -> dict:
    return {k: jnp.stack([m[k] for m in items]) for k in items[0]}


def _progress(cfg: ml_collections.ConfigDict, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.train.num_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not cfg.train.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
    )
