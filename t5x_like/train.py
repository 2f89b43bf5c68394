"""The training loop. It knows no model family: it calls ``family.features`` and ``loss_fn``.

Resume order (every run, fresh or not):
  0. test-write the workdir (a read-only or missing mount fails before anything compiles);
  1. build the experiment from the config (vocabulary, family, mesh, shardings, optimizer);
  2. restore the newest readable checkpoint in WORKDIR/checkpoints, else initialise
     (incomplete saves of a killed process and unreadable steps are reported and skipped);
  3. reopen the data stream and skip the batches the checkpoint says were consumed;
  4. step from ``state['step']`` to ``train.num_steps`` with key = fold_in(seed key, step),
     so masks, dropout and data are the same as in a run that never stopped; updates with a
     non-finite loss or gradient are skipped; SIGTERM or a maintenance notice checkpoints the
     step in flight and stops (exit 0);
  5. report skipped updates, skipped data and a preemption.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers

from t5x_like import faults, partitioning, preemption, storage
from t5x_like.checkpoints import Checkpoints, check_free_space, check_writable
from t5x_like.data.corpus import data_report_lines
from t5x_like.evaluation.loop import (  # noqa: F401  re-exported: train.evaluate etc.
    EVAL_KEY_SALT,
    device_batches,
    evaluate,
    make_eval_step,
)
from t5x_like.experiment import Experiment, build
from t5x_like.families.base import summarize

# --------------------------------------------------------------------------- step functions


def accumulate_gradients(family, params: dict, features: dict, key: jax.Array, accum: int,
                         grad_shardings=None):
    """(summed gradients, summed metrics, carry) over ``accum`` equal micro-batches.

    Sums, not means: divided once by the total weight, they equal the whole batch's gradient
    whatever the split. Micro-batch i gets dropout key ``fold_in(key, i)``. The family's
    carry for the next batch (``sums['carry']``, per example; None without one) is
    concatenated back in batch order, not summed.

    ``grad_shardings`` (the parameters' shardings) pins each micro-batch's gradients, and so
    the accumulation carry, to their parameter's layout, as T5X pins its ``grad_accum``: each
    is reduce-scattered into its fsdp shard inside the loop instead of the carry taking a
    layout of XLA's choosing (T5 on v5p:2x2x2, data 2 x fsdp 4, 2 micro-batches: all-reduce
    bytes 3.9 -> 2.8 MB a step; benchmarks/RESULTS.md, pod plan). With one micro-batch the step's
    output shardings already ask for the same.
    """
    grad_fn = jax.grad(family.loss_fn, has_aux=True)

    def micro_step(mb, k):
        grads, sums = grad_fn(params, mb, k)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return (grads, sums), sums.pop("carry", None)

    if accum == 1:
        (grads, sums), carry = micro_step(features, key)
        return grads, sums, carry
    micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), features)

    def add_micro(total, inputs):
        index, mb = inputs
        summed, carry = micro_step(mb, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, total, summed), carry

    zeros = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro), key)[0]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (grads, sums), carries = jax.lax.scan(add_micro, zeros, (jnp.arange(accum), micro))
    carry = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), carries)
    return grads, sums, carry


def make_train_step(exp: Experiment):
    """A jitted ``(state, batch) -> (state, metrics)`` with donated state.

    An update whose loss or gradient is not finite is skipped (``faults``): parameters,
    optimizer state and carry stay as they were, the step counter advances,
    ``metrics['skipped']`` is 1.
    """
    return _jit_step(exp, _train_step_fn(exp), exp.batch_sharding)


def make_multi_step(exp: Experiment, steps: int):
    """A jitted ``(state, (batch_1, ..., batch_k)) -> (state, metrics [k])``: ``steps`` train
    steps in one call, a ``lax.scan`` of ``make_train_step``'s step over the batches.

    Bit-identical to ``steps`` calls of ``make_train_step`` (each step folds its own counter
    into the key). Why: XLA:CPU allocates an executable's temporaries at every call and the
    kernel faults their pages in afresh (1.3 GB for the T5 ``make bench`` step); inside one
    call the loop body reuses them, so on CPU 4 steps a call ran ~1.18x faster a step
    (benchmarks/RESULTS.md). Accelerators save a host dispatch per step.
    """
    step = _train_step_fn(exp)

    def multi_step(state: dict, batches: tuple):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        return jax.lax.scan(step, state, stacked)

    return _jit_step(exp, multi_step, (exp.batch_sharding,) * steps)


def _jit_step(exp: Experiment, fn, batch_sharding):
    repl = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
    rules = partitioning.rules_from_config(exp.config.mesh)  # activations' layout too
    return jax.jit(
        partitioning.with_activation_sharding(fn, exp.mesh, rules),
        in_shardings=(exp.state_shardings, batch_sharding),
        out_shardings=(exp.state_shardings, repl),
        donate_argnums=0,
    )


def _train_step_fn(exp: Experiment):
    """The unjitted ``(state, batch) -> (state, metrics)`` of ``make_train_step``."""
    family, tx, schedule = exp.family, exp.tx, exp.schedule
    accum = exp.config.optimizer.grad_accum_steps
    nan_steps = faults.injected_nan_steps()  # () outside fault-injection tests

    def train_step(state: dict, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        noise_key, dropout_key = jax.random.split(key)
        # The objective runs on the whole batch first, so micro-batching changes no mask.
        features = family.features(batch, noise_key)
        if "carry" in state:
            features["carry"] = state["carry"]
        params = state["params"]
        grads, sums, carry = accumulate_gradients(family, params, features, dropout_key, accum,
                                                  exp.state_shardings["params"])
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        if nan_steps:
            grads = faults.inject_nan(grads, state["step"], nan_steps)
        loss = sums["loss"] / weight
        ok = faults.finite(loss, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        updated = optax.apply_updates(params, updates)
        if hasattr(family, "after_update"):  # state no gradient moves (compress: EMA, masks)
            updated = family.after_update(params, updated, features, state["step"])
        new_params, opt_state = faults.keep_if(
            ok, (updated, opt_state), (params, state["opt_state"])
        )
        new_state = {
            "params": new_params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        if carry is not None:
            new_state["carry"] = faults.keep_if(ok, carry, state["carry"])
        metrics = {
            **summarize(sums),
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "skipped": 1.0 - ok.astype(jnp.float32),
        }
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------- the loop


class MetricsLog:
    """TensorBoard (via clu) plus a JSON-lines file, written by process 0 only.

    On object storage (no append) both are written to a local staging folder and uploaded
    whole every ``storage.SYNC_SECONDS`` and at the end (``storage.Mirror``).
    """

    def __init__(self, workdir: Path):
        self.primary = jax.process_index() == 0
        remote = self.primary and storage.is_remote(workdir)
        self.mirror = storage.Mirror(workdir, pull=("metrics.jsonl",)) if remote else None
        local = self.mirror.local if self.mirror else workdir
        self.writer = metric_writers.create_default_writer(
            str(local / "tensorboard"), just_logging=not self.primary
        )
        path = local / "metrics.jsonl"
        if self.primary:
            _drop_partial_last_line(path)
        self.jsonl = open(path, "a") if self.primary else None  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()
        if self.mirror and self.mirror.due():
            self.writer.flush()
            self.mirror.sync()

    def close(self) -> None:
        self.writer.flush()
        if self.jsonl:
            self.jsonl.close()
        if self.mirror:
            self.mirror.close()


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write leaves half a JSON line; cut it so the file stays parseable."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def train(config: ml_collections.ConfigDict, workdir: str | Path, devices=None) -> dict:
    """Trains (or resumes) to ``train.num_steps``; returns the last logged and eval metrics.

    On SIGTERM or a maintenance notice it checkpoints the step in flight and returns early,
    with ``result['preempted_at_step']``; running it again resumes there.
    """
    workdir = storage.as_path(workdir)  # a local folder or gs:// (storage.py)
    # 0. the workdir takes a write before anything is built or compiled
    check_writable(workdir)
    # 1. experiment
    exp = build(config, devices)
    cfg = exp.config
    tc = cfg.train
    if jax.process_index() == 0:
        exp.write_config(workdir)
    # A prepared store is opened and checked (shards, sizes, checksums, vocabulary) here,
    # before any state is restored or any step compiles.
    exp.family.open_data("train")
    if tc.eval_batches:
        exp.family.open_data(cfg.data.eval_split)
    # 2. state
    checkpoints = Checkpoints(workdir, keep=tc.keep_checkpoints)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(exp.abstract_state()))
    check_free_space(workdir, state_bytes)
    state, meta = exp.restore_or_init(checkpoints)
    start = int(jax.device_get(state["step"]))
    if start:
        print(f"resumed from step {start} in {workdir}", flush=True)
    # 3. data
    batches = device_batches(exp, split="train", skip_batches=int(meta["batches_consumed"]))
    # 4. steps
    train_step = make_train_step(exp)
    multi_step = make_multi_step(exp, tc.steps_per_call) if tc.steps_per_call > 1 else None
    eval_step = make_eval_step(exp)
    log = MetricsLog(workdir)
    health = faults.StepHealth(tc.max_skipped_steps, tc.loss_spike_factor)
    stop = preemption.Preemption(tc.maintenance_poll_seconds)
    clock = preemption.Clock(tc.checkpoint_every_minutes)
    tokens_per_batch = cfg.data.batch_size * exp.family.raw_length
    pending: list[dict] = []  # per-call metrics, each with a leading steps axis
    result: dict[str, float] = {}
    preempted: tuple[int, str] | None = None
    progress = _progress(cfg, start)
    tick, tick_step = time.perf_counter(), start
    data_wait = 0.0  # seconds spent waiting for the next batch since the last log line
    try:
        done = start
        while done < tc.num_steps:
            steps = _steps_this_call(done, tc)
            waited = time.perf_counter()
            batch = tuple([next(batches) for _ in range(steps)])
            data_wait += time.perf_counter() - waited
            if steps == 1:
                state, metrics = train_step(state, batch[0])
                metrics = jax.tree.map(lambda x: x[None], metrics)
            else:
                state, metrics = multi_step(state, batch)
            pending.append(metrics)
            done += steps
            at_log_step = done % tc.log_every == 0 or done == tc.num_steps
            if at_log_step:
                host = jax.device_get(_concatenate(pending))
                first = done - len(host["loss"]) + 1
                # Raises (before any save below) when too many updates in a row were skipped.
                for line in health.observe(first, host["loss"], host["skipped"]):
                    progress.write(line)
                pending.clear()
                scalars = _means_of_applied_steps(host)
                scalars["train/skipped_steps"] = health.skipped_total
                scalars["train/loss_spikes"] = health.spikes
                now = time.perf_counter()
                scalars["train/tokens_per_s"] = tokens_per_batch * (done - tick_step) / (now - tick)
                scalars["train/data_wait_s"] = data_wait / (done - tick_step)  # per step
                tick, tick_step, data_wait = now, done, 0.0
                log.write(done, scalars)
                result.update(scalars)
                packed = {"pack": f"{scalars['train/packing/efficiency']:.2f}"} if (
                    "train/packing/efficiency" in scalars) else {}  # real / row tokens
                progress.set_postfix(
                    loss=f"{scalars['train/loss']:.3f}",
                    tok_s=f"{scalars['train/tokens_per_s']:.0f}",
                    **packed,
                )
            progress.update(steps)
            if tc.eval_batches and (done % tc.eval_every == 0 or done == tc.num_steps):
                scores = evaluate(exp, state["params"], eval_step=eval_step)
                scalars = {f"eval/{k}": v for k, v in scores.items()}
                log.write(done, scalars)
                result.update(scalars)
                progress.write(
                    f"step {done}: eval loss {scores['loss']:.4f} accuracy "
                    f"{scores.get('accuracy', float('nan')):.4f}"
                )
            reason = stop.requested(done, at_log_step=at_log_step)
            if (
                done % tc.checkpoint_every == 0
                or done == tc.num_steps
                or reason
                or (at_log_step and preemption.agree(clock.due()))
            ):
                checkpoints.save(
                    done, exp.saved_state(state),
                    {"batches_consumed": done, "step": done, "config": cfg.to_dict()},
                )
                clock.reset()
            if reason:
                preempted = (done, reason)
                break
    finally:
        progress.close()
        stop.close()
        log.close()
        checkpoints.close()  # waits for the last save; a failed one raises UserError here
    # 5. report
    if health.skipped_total:
        print(f"note: {health.skipped_total} update(s) skipped for a non-finite loss or "
              f"gradient; {health.spikes} loss spike(s) logged", flush=True)
    for line in data_report_lines():
        print(line, flush=True)
    if preempted:
        print(f"stopped at step {preempted[0]} on {preempted[1]}: checkpoint {preempted[0]} is "
              f"saved in {workdir}; run the same command to resume", flush=True)
        result["preempted_at_step"] = preempted[0]
    result["step"] = int(jax.device_get(state["step"]))
    return result


def _means_of_applied_steps(host: dict) -> dict[str, float]:
    """Per-metric means over the steps whose update was applied (all steps if none was)."""
    applied = host["skipped"] == 0
    rows = applied if applied.any() else np.ones_like(applied)
    return {f"train/{k}": float(np.mean(v[rows])) for k, v in host.items() if k != "skipped"}


def _concatenate(items: list[dict]) -> dict:
    return {k: jnp.concatenate([m[k] for m in items]) for k in items[0]}


def _steps_this_call(done: int, tc: ml_collections.ConfigDict) -> int:
    """``train.steps_per_call`` steps when no log, eval or checkpoint step falls before the
    call's last step (those run on the host between calls), else one."""
    every = [tc.log_every, tc.checkpoint_every] + ([tc.eval_every] if tc.eval_batches else [])
    next_boundary = min([tc.num_steps] + [(done // n + 1) * n for n in every])
    return tc.steps_per_call if done + tc.steps_per_call <= next_boundary else 1


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
