"""N processes of ``t5x-like`` on this machine, as N hosts would run them.

Each process gets ``T5X_LIKE_COORDINATOR=127.0.0.1:<free port>``, its process id and, with
``--devices-per-process D``, D fake CPU devices (``XLA_FLAGS``); ``distributed.initialize``
then joins them with gloo collectives. Their output is streamed with a ``[i]`` prefix; when
one fails the others are stopped, and the launcher exits with the first failure's status.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

from t5x_like import distributed
from t5x_like.errors import UserError

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
GRACE_S = 10.0  # how long a stopped process may take to exit before it is killed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=2, help="processes to start (default 2)")
    p.add_argument(
        "--devices-per-process",
        type=int,
        default=1,
        help="fake CPU devices per process (XLA_FLAGS); 0 = the platform's real devices",
    )
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, index: int, processes: int, port: int, devices: int) -> dict:
    """The environment of process ``index``: coordinator, its id, fake devices, unbuffered."""
    env = dict(base)
    env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[distributed.ENV_NUM_PROCESSES] = str(processes)
    env[distributed.ENV_PROCESS_ID] = str(index)
    env.pop(distributed.ENV_MODE, None)
    env["PYTHONUNBUFFERED"] = "1"
    if devices:
        flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _argv(command: list[str]) -> list[str]:
    return [sys.executable, "-m", "t5x_like.cli", *command[1:]]  # command[0] is "t5x-like"


def _pump(index: int, stream, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{index}] {line}")
            sys.stdout.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def dry_run(args: argparse.Namespace, command: list[str], port: int) -> str:
    keys = (
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        "XLA_FLAGS",
        "JAX_PLATFORMS",
    )
    lines = [
        "#!/usr/bin/env bash",
        f"# {args.processes} local processes, coordinator "
        f"127.0.0.1:{port}; the launcher also stops all if one fails",
    ]
    for i in range(args.processes):
        env = process_env(
            {}, index=i, processes=args.processes, port=port, devices=args.devices_per_process
        )
        assign = [f"{k}={shlex.quote(env[k])}" for k in keys if k in env]
        lines.append(" ".join([*assign, shlex.join(_argv(command))]) + " &")
    lines.append("wait")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: list[str]) -> int:
    """Starts the processes, streams their output, returns the first non-zero status or 0."""
    if args.processes < 1:
        raise UserError(f"--processes must be at least 1, got {args.processes}")
    if args.devices_per_process < 0:
        raise UserError(f"--devices-per-process must be >= 0, got {args.devices_per_process}")
    port = args.port or free_port()
    if args.dry_run:
        sys.stdout.write(dry_run(args, command, port))
        return 0
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i in range(args.processes):
        env = process_env(
            os.environ,
            index=i,
            processes=args.processes,
            port=port,
            devices=args.devices_per_process,
        )
        p = subprocess.Popen(
            _argv(command),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True))
        pumps[-1].start()
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every process, not just the first live one
            if all(c is not None for c in codes):
                break
            failed = [(i, c) for i, c in enumerate(codes) if c]
            if failed:
                i, status = failed[0]
                with lock:
                    print(
                        f"launch: process {i} exited with status {status}; stopping the others",
                        file=sys.stderr,
                        flush=True,
                    )
                _stop(procs)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        status = 130
    for t in pumps:
        t.join(timeout=5)
    if not status:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status
