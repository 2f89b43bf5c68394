"""A compressed encoder as a folder: ``config.json`` (the EncoderConfig + notes) and
``weights.safetensors`` (every parameter under its ``/``-joined path, int8 tensors as int8).

This is what ``compress-report`` measures on disk and what int8 inference reloads; unlike a
training checkpoint it holds no optimizer state, teacher or movement scores.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models.encoder import EncoderConfig, EncoderModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            value = np.asarray(value)  # (ascontiguousarray would make scalars 1-d)
            out[name] = value if value.flags.c_contiguous else value.copy()
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save(folder: str | Path, config: EncoderConfig, params: Mapping,
         notes: Mapping[str, Any] | None = None) -> Path:
    """Writes the folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"encoder": dataclasses.asdict(config), "notes": dict(notes or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    safetensors.numpy.save_file(_flatten(jax.device_get(params)), str(folder / WEIGHTS_FILE))
    return folder


def load(folder: str | Path) -> tuple[EncoderConfig, dict, dict]:
    """(config, params, notes) of a folder written by ``save``."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a compressed-model folder (needs {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE})")
    payload = json.loads((folder / CONFIG_FILE).read_text())
    config = EncoderConfig.from_dict(payload["encoder"])
    params = _unflatten(safetensors.numpy.load_file(str(folder / WEIGHTS_FILE)))
    return config, params, payload.get("notes", {})


def merge(config: EncoderConfig, params: Mapping) -> EncoderModel:
    """The module for ``params`` (shapes and dtypes checked against the config)."""
    abstract = nnx.eval_shape(lambda: EncoderModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    expected = nnx.to_pure_dict(state)
    want = {k: (v.shape, np.dtype(v.dtype)) for k, v in _flatten_abstract(expected).items()}
    got = {k: (jnp.shape(v), np.dtype(jnp.result_type(v)))
           for k, v in _flatten_abstract(params).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()), key=str)[:3]
        raise UserError(f"the parameters do not fit the encoder config (first differences: "
                        f"{diff})")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def _flatten_abstract(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten_abstract(value, name + "/") if isinstance(value, Mapping)
                   else {name: value})
    return out


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
