"""A Cloud TPU VM slice: create it, install this code on every worker, train, delete it.

One slice is a TPU VM (``gcloud compute tpus tpu-vm create``) or, with ``--queued`` or
several ``--num-slices``, a queued resource (``gcloud compute tpus queued-resources create``;
multislice nodes are ``NAME-0``, ``NAME-1``, ... and get the MEGASCALE_* variables from it).
Every worker runs the same ``t5x-like`` command with ``T5X_LIKE_DISTRIBUTED=auto``, so JAX
finds its peers from the TPU metadata. ssh with ``--worker=all`` streams every worker's log.

The workdir must be one folder all workers share (a gcsfuse or Filestore mount): orbax
writes each host's shards of a checkpoint into it.
"""

from __future__ import annotations

import argparse
import shlex

from t5x_like.errors import UserError
from t5x_like.launch import ROOT, Command, Parallel, Plan, Shell

# accelerator-type prefix -> default TPU VM runtime version
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
JAX_TPU = "jax[tpu]>=0.10.2,<0.11"
SOURCES = ("pyproject.toml", "README.md", "t5x_like", "configs")


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
        "--install",
        help="pip spec to install instead of copying this checkout (e.g. git+https://...)",
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


def _where(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def _ssh(node: str, args, remote: str) -> Command:
    return Command(
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            node,
            "--worker=all",
            *_where(args),
            f"--command={remote}",
        ]
    )


def plan(args: argparse.Namespace, command: list[str]) -> Plan:
    if args.num_slices < 1:
        raise UserError(f"--num-slices must be at least 1, got {args.num_slices}")
    version = args.version or runtime_version(args.accelerator_type)
    queued = args.queued or args.num_slices > 1
    nodes = (
        [f"{args.name}-{i}" for i in range(args.num_slices)] if args.num_slices > 1 else [args.name]
    )
    spot = ["--spot"] if args.spot else []
    out = Plan(
        notes=[
            f"{args.num_slices} x {args.accelerator_type} ({version}) in {args.zone}; "
            f"nodes: {', '.join(nodes)}",
            "the workdir must be a folder every worker shares (gcsfuse/Filestore mount)",
        ]
    )

    # 1. capacity
    if queued:
        count = (
            ["--node-count", str(args.num_slices), "--node-prefix", args.name]
            if args.num_slices > 1
            else ["--node-id", args.name]
        )
        out.add(
            Command(
                [
                    "gcloud",
                    "compute",
                    "tpus",
                    "queued-resources",
                    "create",
                    args.name,
                    *count,
                    f"--accelerator-type={args.accelerator_type}",
                    f"--runtime-version={version}",
                    *_where(args),
                    *spot,
                ],
                note="request the slice(s) as a queued resource",
            )
        )
        describe = shlex.join(
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "describe",
                args.name,
                *_where(args),
                "--format=value(state.state)",
            ]
        )
        out.add(
            Shell(
                f'until [ "$({describe})" = ACTIVE ]; do sleep 30; done',
                note="wait until the queued resource is ACTIVE",
            )
        )
    else:
        out.add(
            Command(
                [
                    "gcloud",
                    "compute",
                    "tpus",
                    "tpu-vm",
                    "create",
                    args.name,
                    f"--accelerator-type={args.accelerator_type}",
                    f"--version={version}",
                    *_where(args),
                    *spot,
                ],
                note="create the TPU VM slice",
            )
        )

    # 2. code on every worker
    if args.install:
        remote = f"python3 -m pip install -q {shlex.quote(args.install)} {shlex.quote(JAX_TPU)}"
        out.add(Parallel([_ssh(n, args, remote) for n in nodes], note="install on all workers"))
    else:
        tarball = f"/tmp/{args.name}-t5x_like.tgz"
        out.add(
            Command(
                ["tar", "czf", tarball, "-C", str(ROOT), "--exclude=__pycache__", *SOURCES],
                note="pack this checkout",
            )
        )
        out.add(
            Parallel(
                [
                    Command(
                        [
                            "gcloud",
                            "compute",
                            "tpus",
                            "tpu-vm",
                            "scp",
                            tarball,
                            f"{n}:t5x_like.tgz",
                            "--worker=all",
                            *_where(args),
                        ]
                    )
                    for n in nodes
                ],
                note="copy it to every worker",
            )
        )
        remote = (
            "mkdir -p ~/t5x_like && tar xzf ~/t5x_like.tgz -C ~/t5x_like && "
            f"python3 -m pip install -q -e ~/t5x_like {shlex.quote(JAX_TPU)}"
        )
        out.add(Parallel([_ssh(n, args, remote) for n in nodes], note="install on every worker"))

    # 3. train on every worker of every slice; ssh streams their output here
    workdir = "cd ~/t5x_like && " if not args.install else ""
    remote = (
        f"set -o pipefail; export PATH=$HOME/.local/bin:$PATH; {workdir}"
        f"T5X_LIKE_DISTRIBUTED=auto {shlex.join(command)} 2>&1 | tee -a ~/t5x_like.log"
    )
    out.add(
        Parallel(
            [_ssh(n, args, remote) for n in nodes],
            note=f"run {command[1]} on all workers (logs stream here)",
        )
    )

    # 4. release the capacity
    if queued:
        delete = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            args.name,
            *_where(args),
            "--force",
            "--quiet",
        ]
    else:
        delete = [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "delete",
            args.name,
            *_where(args),
            "--quiet",
        ]
    out.add(Command(delete, note="delete the slice(s)", cleanup=True))
    return out
