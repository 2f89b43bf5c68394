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

When a process dies (SIGKILL, a lost host), the others would wait in their next collective,
and JAX's own coordination service would end them only after its heartbeat timeout, with a
C++ fatal log and a stack trace (its missed-heartbeat callback cannot be replaced from Python
in jaxlib 0.10: the status it passes has no Python type). So every process also runs a
``_Watchdog`` thread: it bumps a counter under ``t5x_like/alive/`` in the coordination
service's key-value store and watches the others' counters; one that stays unchanged for
``--heartbeat-timeout`` seconds (default 30, ``$T5X_LIKE_HEARTBEAT_TIMEOUT``) stops this
process with one sentence and exit status 75. JAX's heartbeat timeout is set well above ours
(``_jax_heartbeat_s``): it remains the backstop, e.g. when the coordinator (process 0) itself
dies, which JAX reports at once from C++.

A peer's death often shows first as an error in a survivor (a collective inside a step or a
checkpoint save fails with "connection reset"). Before any error is reported, the survivor
waits (``wait_for_watchdog``) until the watchdog has seen every other process alive after it,
so a dead peer is named, with status 75, instead of the error it caused.

On CPU, gloo connects each group of devices the first time a program uses it and waits a fixed
30 s (jaxlib 0.10 has no setting for it; ``--xla_cpu_collective_timeout_seconds`` does not
change it) for every process to arrive, so a process that compiles its first step later than
another on a loaded machine used to break the run. ``_connect_collectives`` connects the groups
a run uses right after joining, behind a barrier that waits as long as the init timeout; a
collective on an already-connected group waits as long as the slowest process needs. A group
that still misses the 30 s ends the waiting process in one sentence (exit status 75).
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from t5x_like.errors import UserError, check, print_error

ENV_COORDINATOR = "T5X_LIKE_COORDINATOR"
ENV_NUM_PROCESSES = "T5X_LIKE_NUM_PROCESSES"
ENV_PROCESS_ID = "T5X_LIKE_PROCESS_ID"
ENV_MODE = "T5X_LIKE_DISTRIBUTED"  # auto | off
ENV_TIMEOUT = "T5X_LIKE_INIT_TIMEOUT"  # seconds to wait for all processes (default 300)
ENV_HEARTBEAT = "T5X_LIKE_HEARTBEAT_TIMEOUT"  # seconds of silence before a process counts as dead
DEFAULT_HEARTBEAT_S = 30
MIN_HEARTBEAT_S = 5
PEER_LOST_EXIT = 75  # sysexits' EX_TEMPFAIL: restarting every process resumes the run
ALIVE_DIR = "t5x_like/alive/"  # key-value directory of the watchdogs' counters

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """How this process joins a run: ``mode`` is 'single', 'explicit' or 'auto'."""

    mode: str
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = 300
    heartbeat_s: int = DEFAULT_HEARTBEAT_S


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The explicit-coordinator flags of the ``train`` and ``eval`` verbs."""
    group = parser.add_argument_group(
        "multi-process", f"(default: ${ENV_COORDINATOR} etc., or a detected TPU/SLURM cluster)"
    )
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, help="processes in the run")
    group.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        metavar="SECONDS",
        help=f"stop when another process has been silent this long (default "
        f"${ENV_HEARTBEAT} or {DEFAULT_HEARTBEAT_S}; at least {MIN_HEARTBEAT_S})",
    )


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
    heartbeat = getattr(args, "heartbeat_timeout", None)
    heartbeat = heartbeat if heartbeat is not None else _int(env.get(ENV_HEARTBEAT), ENV_HEARTBEAT)
    heartbeat = DEFAULT_HEARTBEAT_S if heartbeat is None else heartbeat
    check(
        heartbeat >= MIN_HEARTBEAT_S,
        f"the heartbeat timeout must be at least {MIN_HEARTBEAT_S} s, got {heartbeat}; "
        f"fix --heartbeat-timeout or ${ENV_HEARTBEAT}",
    )
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
        return Cluster("explicit", coordinator, num, pid, timeout, heartbeat)
    if mode == "auto" or (mode != "off" and _slurm_multi_task(env)):
        return Cluster("auto", timeout_s=timeout, heartbeat_s=heartbeat)
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
                heartbeat_timeout_seconds=_jax_heartbeat_s(cluster.heartbeat_s),
            )
        else:
            jax.distributed.initialize(
                initialization_timeout=cluster.timeout_s,
                heartbeat_timeout_seconds=_jax_heartbeat_s(cluster.heartbeat_s),
            )
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
    joined = Cluster(
        cluster.mode,
        cluster.coordinator,
        jax.process_count(),
        jax.process_index(),
        cluster.timeout_s,
        cluster.heartbeat_s,
    )
    if joined.num_processes > 1:
        from jax._src import distributed as jax_distributed  # the client multihost_utils uses

        client = jax_distributed.global_state.client
        _Watchdog(client, joined).start()
        _connect_collectives(client, joined)
    return joined


GLOO_CONNECT_S = 30  # gloo's fixed wait for the peers of a new group (jaxlib 0.10: no setting)
COLLECTIVES_BARRIER = "t5x_like/collectives"


def _connect_collectives(client: Any, cluster: Cluster) -> None:
    """Forms, while every process is in step, the gloo groups a run's collectives use.

    On CPU each group of devices (a "clique") is connected by gloo the first time a program
    uses it, and gloo waits only a fixed 30 s for the other processes to arrive; a process
    that compiles its first step more slowly than another (a loaded machine) then breaks the
    run. Connected here after a barrier that waits up to the init timeout, the group of all
    devices (the training and eval steps) and those of device i of every process
    (``multihost_utils.process_allgather``) are reused later, when a collective waits as long
    as the slowest process needs. Other groups (a model axis spanning processes) still
    connect on first use, under gloo's 30 s; missing that ends in ``_gloo_connect_failure``'s
    sentence.
    """
    import jax

    if jax.default_backend() != "cpu":  # TPU/GPU collectives do not go through gloo
        return
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("all",))
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("all")), np.ones(jax.local_device_count(), np.int32)
    )
    total = (jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
             .lower(ones).compile())  # compiled before the barrier: they run in step after it
    try:
        client.wait_at_barrier(COLLECTIVES_BARRIER, cluster.timeout_s * 1000)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(
            f"process {cluster.process_id} of {cluster.num_processes} waited {cluster.timeout_s}"
            f" s for the other processes to start ({first}); start all processes (raise "
            f"${ENV_TIMEOUT} if some start later)"
        ) from e
    check(int(total(ones)) == jax.device_count(), "the all-device sum is wrong")
    multihost_utils.process_allgather(np.int32(cluster.process_id))


def _gloo_connect_failure(exc: BaseException | None, cluster: Cluster) -> str | None:
    """The sentence for a collective whose gloo group did not connect (a process that did
    not arrive within gloo's fixed 30 s), or None for any other error."""
    import re

    seen = 0
    while exc is not None and seen < 10 and "Gloo context initialization failed" not in str(exc):
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    if exc is None or seen >= 10:
        return None
    text = str(exc)
    key = re.search(r"gloo/([\d,]+)/(\d+)", text)  # the group's device ids, the missing rank
    who = "another process"
    if key:
        import jax

        ids = [int(i) for i in key.group(1).split(",")]
        owner = {d.id: d.process_index for d in jax.devices()}
        missing = ids[int(key.group(2))] if int(key.group(2)) < len(ids) else None
        if missing in owner:
            who = f"process {owner[missing]}"
    return (
        f"process {cluster.process_id} of {cluster.num_processes} gave up on its first "
        f"collective over a new group of devices after gloo's fixed {GLOO_CONNECT_S} s: "
        f"{who} did not join it in time (it is late, e.g. still compiling on a loaded "
        f"machine, or it never got there); jax 0.10 has no setting for this wait, so start "
        f"all processes together with the same coordinator address, give each enough CPU, "
        f"and restart all of them with the same command to resume from the last checkpoint"
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


def _interval_s(heartbeat_s: float) -> float:
    """How often a watchdog bumps its counter and reads the others': six times per timeout."""
    return min(max(heartbeat_s / 6, 0.5), 10.0)


def _jax_heartbeat_s(heartbeat_s: int) -> int:
    """JAX's own heartbeat timeout: the backstop, far enough above ours that our sentence
    comes first (JAX may notice a missing heartbeat up to half its timeout early)."""
    return int(2 * (heartbeat_s + _interval_s(heartbeat_s)) + 10)


class _Watchdog:
    """Stops this process, in one sentence, when another process of the run goes silent.

    Each process bumps ``ALIVE_DIR/<its id>`` every ``_interval_s`` and reads the directory;
    a counter unchanged for ``heartbeat_s`` (on this process's clock, so hosts' clocks need not
    agree) means that process is dead or hung. The check runs in a thread, so it works
    whether the main thread waits in a collective or computes on the host; JAX releases the
    GIL while it compiles and runs, so a busy host keeps its own counter moving.
    """

    def __init__(
        self,
        client: Any,
        cluster: Cluster,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.cluster = cluster
        self.timeout = cluster.heartbeat_s
        self.interval = _interval_s(cluster.heartbeat_s)
        self.clock = clock
        # Set at interpreter exit: the thread stops (``_at_exit``), and a service that is
        # gone is no longer an error.
        self.exiting = threading.Event()
        self._thread: threading.Thread | None = None
        self.count = 0
        now = clock()
        others = set(range(cluster.num_processes)) - {cluster.process_id}
        self.last_value: dict[int, str | None] = dict.fromkeys(others)
        self.last_change = dict.fromkeys(others, now)
        self.last_read: tuple[float, dict[str, str]] = (-float("inf"), {})  # (began, values)
        self.last_tick = now
        self.failing_since: float | None = None

    def start(self) -> None:
        global _running
        atexit.register(self._at_exit)  # after jax's own atexit, so it runs before shutdown
        previous = sys.excepthook

        def hook(kind, exc, tb):
            wait_for_watchdog(exc)  # a dead peer's sentence, not this error's traceback
            previous(kind, exc, tb)

        sys.excepthook = hook
        self._thread = threading.Thread(target=self._run, name="t5x_like-watchdog", daemon=True)
        self._thread.start()
        _running = self

    def all_moved(self, before: dict[str, str], after: dict[str, str]) -> bool:
        """Whether every other process's counter differs between two reads (or it exited)."""
        return all(after.get(str(j)) == "exit" or after.get(str(j)) != before.get(str(j))
                   for j in self.last_value)

    def _at_exit(self) -> None:
        """A process that is exiting waits in JAX's shutdown barrier: not a dead one.

        The thread is stopped and joined here, before JAX shuts its client down: a daemon
        thread still inside a key-value call when the interpreter finalises is unwound
        through C++ frames, and the process aborts ("FATAL: exception not rethrown", seen on
        a finished run's process 1). JAX's own heartbeat judges the shutdown barrier.
        """
        self.exiting.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 10)
        try:
            self.client.key_value_set(
                f"{ALIVE_DIR}{self.cluster.process_id}", "exit", allow_overwrite=True
            )
        except Exception:
            pass

    def _run(self) -> None:
        while not self.exiting.wait(self.interval):
            verdict = self.tick()
            if verdict == "exit":
                return
            if verdict:
                _stop_process(verdict)

    def tick(self) -> str | None:
        """One round: bump, read, judge. Returns the sentence to stop with, "exit" once
        this process is exiting and the service is gone, or None."""
        now = self.clock()
        if now - self.last_tick > self.timeout / 2:  # this thread itself was not scheduled:
            self.last_change = dict.fromkeys(self.last_change, now)  # judge nobody on that
        self.last_tick = now
        self.count += 1
        try:
            self.client.key_value_set(
                f"{ALIVE_DIR}{self.cluster.process_id}", str(self.count), allow_overwrite=True
            )
            entries = self.client.key_value_dir_get(ALIVE_DIR)
        except Exception as e:
            if self.exiting.is_set():
                return "exit"
            self.failing_since = self.failing_since or now
            if now - self.failing_since < self.timeout:
                return None
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            return (
                f"process {self.cluster.process_id} of {self.cluster.num_processes} lost "
                f"contact with the coordinator {self.cluster.coordinator or '(process 0)'} "
                f"for {self.timeout} s ({first}); this run is stopping: restart all processes "
                f"with the same command to resume from the last checkpoint"
            )
        self.failing_since = None
        values = {key.rsplit("/", 1)[-1]: value for key, value in entries}
        self.last_read = (now, values)
        for j in list(self.last_change):
            value = values.get(str(j))
            if value == "exit":  # finished, waiting for the others in JAX's shutdown
                del self.last_change[j]
            elif value != self.last_value[j]:
                self.last_value[j], self.last_change[j] = value, now
        dead = sorted(j for j, t in self.last_change.items() if now - t >= self.timeout)
        if not dead:
            return None
        who = (f"process {dead[0]}" if len(dead) == 1
               else f"processes {', '.join(map(str, dead))}")
        return (
            f"{who} of {self.cluster.num_processes} stopped responding (no heartbeat for "
            f"{self.timeout} s); this run is stopping: restart all processes with the same "
            f"command to resume from the last checkpoint"
        )


_running: _Watchdog | None = None  # this process's watchdog, once a multi-process run started


def wait_for_watchdog(exc: BaseException | None) -> None:
    """Before ``exc`` is reported, lets the watchdog name a dead peer instead.

    In a multi-process run the first symptom of another process dying is often an error in
    this one: a collective's "connection reset" inside a step or a checkpoint save. Reporting
    that error would blame the wrong thing, and a normal exit would then abort in JAX's
    shutdown barrier. So this returns once every other process has been heard from after the
    error (the error is this process's own), or never: the watchdog, which judges a silent
    peer within ``heartbeat_s`` and a round, ends the process with the peer-lost sentence.
    Returns at once in a single-process run and for Ctrl-C.
    """
    dog = _running
    if dog is None or isinstance(exc, KeyboardInterrupt):
        return
    late = _gloo_connect_failure(exc, dog.cluster)
    if late:  # a dead peer would be named by the watchdog within two rounds
        threading.Event().wait(2 * dog.interval)
        _stop_process(late)
    # Alive: a counter that moved between two of the watchdog's reads that both began after
    # the error (the first read after a peer's death may still show its last bump as new).
    since = dog.clock()
    deadline, first = since + dog.timeout + 3 * dog.interval, None
    while dog.clock() < deadline:
        began, values = dog.last_read
        if began > since:
            if first is None:
                first = values
            elif dog.all_moved(first, values):
                return
        threading.Event().wait(min(0.1, dog.interval / 4))


def _stop_process(sentence: str) -> None:
    """Ends the process at once: the main thread may be blocked in a collective that will
    never return, so no exception could reach it. Checkpoints already written are intact."""
    print_error(sentence)
    os._exit(PEER_LOST_EXIT)


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


def host_array(x) -> np.ndarray:
    """The whole value of ``x`` on this host: an array sharded over several processes is
    gathered from all of them (every process must call this, in the same order)."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
