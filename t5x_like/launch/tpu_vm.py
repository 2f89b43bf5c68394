"""Cloud TPU VM slices: create, start training detached on every worker, follow it, recreate
after preemption, delete.

The plan is one bash script rendered from ``launch/tpu_vm.sh`` (the driver, run here) with
``launch/tpu_vm_worker.sh`` (the startup script every worker runs) inside it; their headers
say what each step does. One slice is a TPU VM (``gcloud compute tpus tpu-vm create``) or,
with ``--queued``, a queued resource; several ``--num-slices`` are always a queued resource
whose nodes are ``NAME-0``, ``NAME-1``, ... (Cloud TPU gives them the MEGASCALE_* variables)
and the command gets ``--config.mesh.dcn_data=K``: the data axis across slices.

Workers install into a uv-made Python 3.11 venv (the TPU images' python3 is older than
pyproject's floor). The workdir must be ``gs://``: every host writes its shards of a checkpoint
there, and a TPU VM's own disk goes away with the VM (and with each preemption).
"""

from __future__ import annotations

import argparse

from t5x_like.errors import UserError
from t5x_like.launch import ROOT, Plan, Script, parse_env, workdir_of
from t5x_like.launch.templates import Raw, render

# accelerator-type prefix -> default TPU VM runtime version
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
JAX_TPU = "jax[tpu]>=0.10.2,<0.11"
PYTHON_VERSION = "3.11"
SOURCES = ("pyproject.toml", "README.md", "t5x_like", "configs", "tasks", "launch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    p.add_argument("--project", required=True, help="Google Cloud project")
    p.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-east5-a (v5p)")
    p.add_argument(
        "--accelerator-type",
        required=True,
        help="e.g. v5litepod-16 (v5e, 16 chips), v5p-32 (16 chips), v6e-16",
    )
    p.add_argument("--version", help="TPU VM runtime version (default: by accelerator type)")
    p.add_argument("--num-slices", type=int, default=1, help="slices (multislice over DCN)")
    p.add_argument("--queued", action="store_true", help="use a queued resource for one slice")
    p.add_argument("--spot", action="store_true", help="spot capacity (may be preempted)")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        help="recreate the capacity and resume at most N times after it is lost (default 10)",
    )
    p.add_argument(
        "--install",
        help="pip spec to install instead of copying this checkout (e.g. git+https://...)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="environment variable for the workers (repeatable)",
    )
    p.add_argument("--keep", action="store_true", help="do not delete the TPU VM at the end")


def runtime_version(accelerator_type: str) -> str:
    prefix = accelerator_type.rsplit("-", 1)[0]
    if prefix not in RUNTIME_VERSIONS:
        raise UserError(
            f"unknown TPU accelerator type {accelerator_type!r}: expected one of "
            f"{', '.join(p + '-N' for p in RUNTIME_VERSIONS)}, or pass --version"
        )
    return RUNTIME_VERSIONS[prefix]


def check_workdir(command: list[str], where: str) -> None:
    """A remote run's workdir is object storage every host and every restart sees."""
    workdir = workdir_of(command)
    if command[1] == "train" and not (workdir or "").startswith("gs://"):
        raise UserError(
            f"--workdir must be a gs:// path on {where}, not {workdir!r}: each host's own "
            "disk holds only its shards of a checkpoint and is lost with the machine"
        )


def worker_script(args: argparse.Namespace, command: list[str]) -> str:
    """``launch/tpu_vm_worker.sh`` filled in."""
    return render(
        "tpu_vm_worker.sh",
        {
            "INSTALL": args.install or "",
            "PYTHON_VERSION": PYTHON_VERSION,
            "JAX_TPU": JAX_TPU,
            "RUN": command,
            "ENV_VARS": parse_env(args.env),
        },
    )


def plan(args: argparse.Namespace, command: list[str]) -> Plan:
    if args.num_slices < 1:
        raise UserError(f"--num-slices must be at least 1, got {args.num_slices}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    check_workdir(command, "a TPU VM")
    version = args.version or runtime_version(args.accelerator_type)
    if args.num_slices > 1:
        command = [*command, f"--config.mesh.dcn_data={args.num_slices}"]
    script = render(
        "tpu_vm.sh",
        {
            "NAME": args.name,
            "PROJECT": args.project,
            "ZONE": args.zone,
            "ACCELERATOR_TYPE": args.accelerator_type,
            "RUNTIME_VERSION": version,
            "NUM_SLICES": args.num_slices,
            "QUEUED": args.queued or args.num_slices > 1,
            "SPOT": args.spot,
            "MAX_RESTARTS": args.max_restarts,
            "KEEP": args.keep,
            "CHECKOUT": "" if args.install else str(ROOT),
            "SOURCES": [] if args.install else list(SOURCES),
            "WORKER_SCRIPT": Raw(worker_script(args, command)),
        },
    )
    return Plan(
        [Script(script)],
        notes=[
            f"{args.num_slices} x {args.accelerator_type} ({version}) in {args.zone}, "
            f"running: {' '.join(command[:2])} ...",
        ],
    )
