"""``t5x-like launch TARGET [options] -- VERB ARGS``: the same run on other machines.

Targets: ``local`` (N processes on this machine, gloo collectives on 127.0.0.1), ``tpu-vm``
(Cloud TPU VM slices), ``gke`` (a JobSet on a TPU slice or GPU node pool) and ``slurm``
(an sbatch script for multi-node GPU). Every remote target builds a *plan*: a list of
commands and files, or one bash script rendered from the repository's ``launch/`` folder
(``templates``). ``--dry-run`` prints the plan as a bash script (files as here-documents)
and runs nothing; otherwise it runs here, and cleanup (deleting the TPU VM or the JobSet)
runs even when training fails: a ``trap`` in the scripts, ``cleanup`` steps in a plan.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from t5x_like.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Command:
    """One command line."""

    argv: list[str]
    note: str = ""
    cleanup: bool = False  # runs even if an earlier step failed (unless --keep)


@dataclass
class File:
    path: str
    text: str
    note: str = ""
    cleanup: bool = False


@dataclass
class Script:
    """A whole bash script (rendered from ``launch/``): printed as is, run with ``bash``."""

    text: str
    note: str = ""
    cleanup: bool = False


Step = Command | File | Script


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed at the top of the dry run

    def add(self, step: Step) -> None:
        self.steps.append(step)


def parse_env(pairs: list[str]) -> list[str]:
    """``--env K=V`` values, checked: K must be a shell variable name."""
    for pair in pairs:
        key, sep, _ = pair.partition("=")
        if not sep or not key.isidentifier() or not key.isascii():
            raise UserError(f"--env {pair!r} is not NAME=VALUE with NAME a variable name")
    return list(pairs)


def workdir_of(command: list[str]) -> str | None:
    """The ``--workdir`` value of a t5x-like command line, if any."""
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return None


def worker_command(command: list[str], overrides: list[str]) -> list[str]:
    """``t5x-like VERB ARGS --config.x=y``: what every worker runs.

    ``command`` is what followed ``--``; the ``--config.*`` overrides were taken out of the
    command line by ``cli.main`` and go back at the end, where any verb accepts them.
    """
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] in ("t5x-like", "t5x_like"):
        command = command[1:]
    if not command:
        raise UserError(
            "launch needs the command to run after '--', e.g. "
            "t5x-like launch local --processes 2 -- train --config configs/t5_span_corruption.py"
            ":tiny --workdir runs/x"
        )
    if command[0] not in ("train", "eval"):
        raise UserError(f"launch runs 'train' or 'eval' on every worker, not {command[0]!r}")
    return ["t5x-like", *command, *overrides]


def render(plan: Plan) -> str:
    """The plan as a bash script a user can read, edit and run by hand."""
    if len(plan.steps) == 1 and isinstance(plan.steps[0], Script):
        first, _, rest = plan.steps[0].text.partition("\n")
        return "\n".join([first, *(f"# {note}" for note in plan.notes), rest])
    lines = ["#!/usr/bin/env bash", "set -euo pipefail"]
    lines += [f"# {note}" for note in plan.notes]
    for step in plan.steps:
        lines.append("")
        if step.note:
            lines.append(f"# {step.note}")
        if step.cleanup:
            lines.append("# (cleanup: runs even if training failed; --keep skips it)")
        if isinstance(step, Command):
            lines.append(shlex.join(step.argv))
        elif isinstance(step, Script):
            raise ValueError("a Script is a plan's only step")
        else:
            lines.append(f"cat > {shlex.quote(step.path)} <<'EOF'")
            lines.append(step.text.rstrip("\n"))
            lines.append("EOF")
    return "\n".join(lines) + "\n"


def _run_step(step: Step) -> int:
    if isinstance(step, File):
        Path(step.path).write_text(step.text)
        print(f"wrote {step.path}", flush=True)
        return 0
    if isinstance(step, Command):
        print(f"+ {shlex.join(step.argv)}", flush=True)
        return subprocess.run(step.argv).returncode
    # a Script runs from a file, not stdin: ssh and kubectl in it would read the rest of it
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="t5x_like_launch_") as f:
        f.write(step.text)
        f.flush()
        return subprocess.run(["bash", f.name]).returncode


def execute(plan: Plan, *, keep: bool = False) -> int:
    """Runs the steps in order; stops at the first failure but still runs cleanup steps."""
    status = 0
    for step in plan.steps:
        if step.cleanup:
            if not keep:
                status = _run_step(step) or status
            continue
        if status:
            continue
        try:
            code = _run_step(step)
        except FileNotFoundError as e:
            print(f"error: {e.filename} is not installed or not on PATH", file=sys.stderr)
            code = 127
        except KeyboardInterrupt:
            code = 130
        if code:
            print(f"step failed with status {code}: {step.note or step}", file=sys.stderr)
            status = code
    return status


def add_targets(parser: argparse.ArgumentParser) -> None:
    """``launch local|tpu-vm|gke|slurm`` sub-commands, each with ``--dry-run``."""
    from t5x_like.launch import gke, local, slurm, tpu_vm

    targets = parser.add_subparsers(dest="target", required=True)
    for name, module, help_text in (
        ("local", local, "N processes on this machine (gloo CPU collectives on 127.0.0.1)"),
        ("tpu-vm", tpu_vm, "a Cloud TPU VM slice: create, install, train on all workers, delete"),
        ("gke", gke, "a JobSet on a GKE TPU slice or GPU node pool, applied with kubectl"),
        ("slurm", slurm, "an sbatch script for multi-node GPU (srun; JAX detects SLURM)"),
    ):
        p = targets.add_parser(
            name,
            help=help_text,
            description=f"{help_text}. Put the t5x-like command after '--'.",
        )
        module.add_arguments(p)
        p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- VERB ARGS (train or eval)")
        p.set_defaults(launch_target=module)


def main(args: argparse.Namespace, overrides: list[str]) -> int:
    """Entry point of the ``launch`` verb: returns the exit status."""
    command = worker_command(args.command, overrides)
    module = args.launch_target
    if module.__name__.endswith(".local"):
        return module.run(args, command)
    plan = module.plan(args, command)
    if args.dry_run:
        sys.stdout.write(render(plan))
        return 0
    return execute(plan, keep=getattr(args, "keep", False))
