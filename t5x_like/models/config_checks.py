"""Validation shared by the model config dataclasses, so every architecture words errors alike.

A config is read from a user's file, so a bad value is a ``UserError`` naming the field, and an
unknown key (a typo, or a field of another architecture) is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from t5x_like.errors import UserError


def check_choices(kind: str, config: Any, choices: Mapping[str, tuple]) -> None:
    """UserError naming the first field of ``config`` whose value is not among its choices."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"{kind} config field {name}={getattr(config, name)!r} is not one of "
                            f"{tuple(allowed)}")


def check_sizes(kind: str, config: Any, positive: tuple[str, ...], rates: tuple[str, ...]) -> None:
    """UserError unless the ``positive`` fields are positive ints and the ``rates`` in [0, 1)."""
    for name in positive:
        if not (isinstance(getattr(config, name), int) and getattr(config, name) > 0):
            raise UserError(f"{kind} config field {name}={getattr(config, name)!r} must be a "
                            "positive integer")
    for name in rates:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise UserError(f"{kind} config field {name}={getattr(config, name)!r} must be in "
                            "[0, 1)")


def check_scan_unroll(kind: str, config: Any) -> None:
    """UserError unless ``scan_unroll`` (layers a trip of a scanned stack) is an int >= 0."""
    value = config.scan_unroll
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise UserError(f"{kind} config field scan_unroll={value!r} must be a non-negative "
                        "integer (layers a trip of the scanned stack; 0: the default for the "
                        "step's devices)")


def strict_from_dict(cls: type, kind: str, d: Mapping[str, Any]) -> Any:
    """Strict: an unknown key is a typo or a different architecture, so it is refused."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in known:
            raise UserError(f"unknown {kind} config key {key!r}; known keys: {sorted(known)}")
    return cls(**d)
