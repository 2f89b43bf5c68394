"""An ``sbatch`` script for multi-node GPU, rendered from ``launch/job.sbatch``: ``srun`` starts
the processes, JAX detects SLURM.

``--per gpu`` (default) runs one process per GPU: JAX's SLURM detection gives each its own
device from SLURM_LOCALID. ``--per node`` runs one process per node that drives all its GPUs
(``JAX_LOCAL_DEVICE_IDS`` lists them). Either way ``T5X_LIKE_DISTRIBUTED=auto`` makes
``distributed.initialize`` call ``jax.distributed.initialize()`` with no arguments.

Time limits and preemption: ``--signal=B:TERM@<--stop-seconds>`` and ``--requeue``; the script
passes SIGTERM on to srun, the run checkpoints and exits 0, and the job requeues itself to
resume (the script's header says how).
"""

from __future__ import annotations

import argparse
import shlex

from t5x_like.errors import UserError
from t5x_like.launch import Command, File, Plan, parse_env
from t5x_like.launch.templates import Raw, render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="t5x-like", help="job name")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per ...")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="24:00:00", help="wall-clock limit, HH:MM:SS")
    p.add_argument("--cpus-per-task", type=int, default=0, help="0 = SLURM's default")
    p.add_argument(
        "--stop-seconds",
        type=int,
        default=300,
        help="SIGTERM this long before the time limit, for the checkpoint (default 300)",
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V",
        help="environment variable for the tasks (repeatable)",
    )
    p.add_argument("--script", help="where to write the script (default NAME.sbatch)")


def script(args: argparse.Namespace, command: list[str]) -> str:
    """``launch/job.sbatch`` filled in."""
    tasks = args.gpus_per_node if args.per == "gpu" else 1
    directives = [
        f"--job-name={args.name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--time={args.time}",
        f"--output={args.name}-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--signal=B:TERM@{args.stop_seconds}",
        "--requeue",
    ]
    if args.cpus_per_task:
        directives.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.partition:
        directives.append(f"--partition={args.partition}")
    if args.account:
        directives.append(f"--account={args.account}")
    exports = [f"export {shlex.quote(pair)}" for pair in parse_env(args.env)]
    if args.per == "node":
        ids = ",".join(str(i) for i in range(args.gpus_per_node))
        exports.append(f"export JAX_LOCAL_DEVICE_IDS={ids}  # one process drives every GPU")
    return render(
        "job.sbatch",
        {
            "SBATCH": Raw("\n".join(f"#SBATCH {d}" for d in directives)),
            "SETUP": Raw("\n  ".join(args.setup) or ":"),
            "EXPORTS": Raw("\n".join(exports) or ":"),
            "RUN": command,
        },
    )


def plan(args: argparse.Namespace, command: list[str]) -> Plan:
    for flag, value in (
        ("--nodes", args.nodes),
        ("--gpus-per-node", args.gpus_per_node),
        ("--stop-seconds", args.stop_seconds),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    path = args.script or f"{args.name}.sbatch"
    processes = args.nodes * (args.gpus_per_node if args.per == "gpu" else 1)
    out = Plan(
        notes=[
            f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s), {processes} "
            f"process(es); log in {args.name}-<jobid>.out"
        ]
    )
    out.add(File(path, script(args, command), note="the batch script"))
    out.add(Command(["sbatch", path], note="submit it"))
    return out
