"""Multi-process runs: start JAX's distributed runtime before anything touches a device.

Which processes belong to one run is decided, in this order, by:

1. an explicit coordinator: ``--coordinator HOST:PORT --num-processes N --process-id I`` on
   ``train``/``eval``, or the environment variables ``T5X_LIKE_COORDINATOR``,
   ``T5X_LIKE_NUM_PROCESSES`` and ``T5X_LIKE_PROCESS_ID`` (what ``t5x-like launch local`` and
   the GKE GPU manifest set). On CPU the processes exchange data through gloo collectives.
2. ``T5X_LIKE_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` with no arguments, i.e.
   JAX's own cluster detection (Cloud TPU VM metadata, GKE TPU env, SLURM, Open MPI). The
   TPU VM, GKE TPU and SLURM launchers set it; a SLURM step with more than one task is
   detected without it.
3. otherwise (or ``T5X_LIKE_DISTRIBUTED=off``): one process, nothing to do.

Everything after this works per process: each reads its own shard of the data
(``train.device_batches``), process 0 alone writes metrics and the config, and orbax
coordinates the checkpoint files.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from t5x_like.errors import UserError

ENV_COORDINATOR = "T5X_LIKE_COORDINATOR"
ENV_NUM_PROCESSES = "T5X_LIKE_NUM_PROCESSES"
ENV_PROCESS_ID = "T5X_LIKE_PROCESS_ID"
ENV_MODE = "T5X_LIKE_DISTRIBUTED"  # auto | off
ENV_TIMEOUT = "T5X_LIKE_INIT_TIMEOUT"  # seconds to wait for all processes (default 300)

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """How this process joins a run: ``mode`` is 'single', 'explicit' or 'auto'."""

    mode: str
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The explicit-coordinator flags of the ``train`` and ``eval`` verbs."""
    group = parser.add_argument_group(
        "multi-process", f"(default: ${ENV_COORDINATOR} etc., or a detected TPU/SLURM cluster)"
    )
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, help="processes in the run")
    group.add_argument("--process-id", type=int, help="this process's index, 0..N-1")


def _int(text: str | int | None, what: str) -> int | None:
    if text is None or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{what} must be an integer, got {text!r}") from None


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.2:1234 or "
            f"127.0.0.1:1234); pass --coordinator or set ${ENV_COORDINATOR}"
        )


def _slurm_multi_task(env) -> bool:
    """A SLURM step with several tasks: JAX's SLURM detection needs all of these."""
    needed = ("SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in env for k in needed) and (_int(env["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1


def resolve(args: argparse.Namespace | None = None, env=None) -> Cluster:
    """The Cluster that flags (they win) and environment variables describe; no side effects."""
    env = os.environ if env is None else env
    coordinator = getattr(args, "coordinator", None) or env.get(ENV_COORDINATOR) or None
    num = getattr(args, "num_processes", None)
    num = num if num is not None else _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    pid = getattr(args, "process_id", None)
    pid = pid if pid is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    timeout = _int(env.get(ENV_TIMEOUT), ENV_TIMEOUT) or 300
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise UserError(f"${ENV_MODE}={mode!r} must be 'auto', 'off' or unset")

    if coordinator is not None or num is not None or pid is not None:
        missing = [
            name
            for name, value in (
                ("coordinator", coordinator),
                ("num-processes", num),
                ("process-id", pid),
            )
            if value is None
        ]
        if missing:
            raise UserError(
                f"a multi-process run needs --coordinator, --num-processes and --process-id "
                f"(or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); "
                f"{', '.join(missing)} is missing"
            )
        if num < 1:
            raise UserError(f"the number of processes must be at least 1, got {num}")
        if not 0 <= pid < num:
            raise UserError(
                f"process id {pid} is out of range for {num} processes: use 0..{num - 1}"
            )
        _check_address(coordinator)
        if num == 1:
            return Cluster("single")
        return Cluster("explicit", coordinator, num, pid, timeout)
    if mode == "auto" or (mode != "off" and _slurm_multi_task(env)):
        return Cluster("auto", timeout_s=timeout)
    return Cluster("single")


def initialize(args: argparse.Namespace | None = None) -> Cluster:
    """Joins the run described by ``args``/the environment; a no-op for one process.

    Must run before the first JAX computation (it fixes the set of devices). Errors a user
    can fix (wrong coordinator, a process that never came) become one UserError sentence.
    """
    cluster = resolve(args)
    if cluster.mode == "single":
        return cluster
    if cluster.mode == "explicit":
        _probe_coordinator(cluster)
    import jax

    # CPU processes exchange collectives through gloo (no effect on TPU/GPU computations).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if cluster.mode == "explicit":
            jax.distributed.initialize(
                cluster.coordinator,
                num_processes=cluster.num_processes,
                process_id=cluster.process_id,
                initialization_timeout=cluster.timeout_s,
            )
        else:
            jax.distributed.initialize(initialization_timeout=cluster.timeout_s)
    except ValueError as e:  # JAX's cluster detection found nothing it knows
        raise UserError(
            f"${ENV_MODE}=auto but JAX detected no Cloud TPU, SLURM or MPI cluster ({e}); "
            f"pass --coordinator/--num-processes/--process-id instead"
        ) from e
    except Exception as e:  # XlaRuntimeError/RuntimeError: coordinator unreachable, timeout
        where = cluster.coordinator or "the detected coordinator"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(
            f"process {cluster.process_id} of {cluster.num_processes} could not join the run "
            f"at {where} within {cluster.timeout_s} s ({first}); check that every process "
            f"was started with the same coordinator address, that process 0 is running and "
            f"that the port is reachable"
        ) from e
    return Cluster(
        cluster.mode,
        cluster.coordinator,
        jax.process_count(),
        jax.process_index(),
        cluster.timeout_s,
    )


def _probe_coordinator(cluster: Cluster) -> None:
    """Fails in one sentence where JAX would abort the process from C++.

    Process 0 must be able to bind the coordinator port; every other process waits (up to
    the timeout) until something listens at the coordinator address.
    """
    host, _, port = cluster.coordinator.rpartition(":")
    host = host.strip("[]")
    if cluster.process_id == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", int(port)))
            except OSError as e:
                raise UserError(
                    f"process 0 cannot open the coordinator port {port} ({e.strerror}); "
                    f"choose a free port in --coordinator / ${ENV_COORDINATOR}"
                ) from None
        return
    deadline = time.monotonic() + cluster.timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"process {cluster.process_id} found no coordinator at "
                    f"{cluster.coordinator} within {cluster.timeout_s} s ({e.strerror or e}); "
                    f"start process 0 with the same address, or fix --coordinator / "
                    f"${ENV_COORDINATOR}"
                ) from None
            time.sleep(0.5)


def until_any_exhausted(items: Iterator[T]) -> Iterator[T]:
    """Yields from a per-process iterator while *every* process still has an item.

    A finite per-host stream (an eval split read in shards) can end on one host before
    another; the hosts that still had a batch would then wait forever in the step's
    collectives. One all-gather of a flag per item keeps every process in step.
    """
    import jax

    if jax.process_count() == 1:
        yield from items
        return
    import numpy as np
    from jax.experimental import multihost_utils

    while True:
        item = next(items, None)
        flags = multihost_utils.process_allgather(np.array(item is not None))
        if not np.all(flags):
            return
        yield item
