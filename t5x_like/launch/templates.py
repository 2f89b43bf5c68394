"""The files in the repository's ``launch/`` folder, filled in.

``launch/`` holds what a user copies and edits (the TPU VM driver and worker scripts, the GKE
driver and JobSet, the sbatch script, the Dockerfile); the launch verbs render from those files,
so there is one copy. A template marks what the launcher fills in as ``@KEY@``: scalars are
shell-quoted, lists become shell words, ``Raw`` text goes in as is (here-document bodies,
``#SBATCH`` lines).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from t5x_like.config import shipped
from t5x_like.errors import UserError

_KEY = re.compile(r"@([A-Z][A-Z0-9_]*)@")


@dataclass(frozen=True)
class Raw:
    """Text inserted unquoted."""

    text: str


def folder() -> Path:
    """``launch/`` next to the package (checkout, editable install) or installed with it."""
    where = shipped("launch")
    if where is None:
        raise UserError(
            "the launch/ templates are not installed: run from a checkout of t5x_like, or "
            "install a build whose pyproject ships launch/ (see README, Launch)"
        )
    return where


def read(name: str) -> str:
    return (folder() / name).read_text()


def _value(value) -> str:
    if isinstance(value, Raw):
        return value.text.rstrip("\n")
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return shlex.join(str(v) for v in value)
    return shlex.quote(str(value))


def render(name: str, values: dict) -> str:
    """``launch/NAME`` with every ``@KEY@`` replaced; a key without a value is an error."""
    text = read(name)
    keys = set(_KEY.findall(text))
    missing, unused = keys - set(values), set(values) - keys
    if missing or unused:  # the template and the launcher disagree: a bug, not user input
        raise ValueError(f"launch/{name}: no value for {sorted(missing)}, unused {sorted(unused)}")
    return _KEY.sub(lambda m: _value(values[m.group(1)]), text)
