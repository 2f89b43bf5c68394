"""What every Hugging Face architecture shares: files, safetensors, and parameter tables.

An architecture module (``hf_t5``, ``hf_bert``, ...) describes its checkpoint with one table of
``(our parameter path, HF tensor name, layout)`` rows; ``params_from_table`` and
``tensors_from_table`` both walk it, so import and export cannot disagree. Weights are read from
safetensors only (a parsed header and raw bytes, never pickle).

Table rows: ``"{i}"`` is a layer index. In our path it names an element of a layer list
(unscanned) or, when layers are scanned, disappears and becomes the leading axis of a stacked
array; the layer count comes from ``layer_counts[first path component]``. Layouts: ``"same"`` =
identical array; ``"linearK"`` = our kernel is ``[in..., out...]`` with K input dims while HF's
torch Linear weight is ``[out, in]`` with the dims flattened. Rows whose our-path the model lacks
(optional parameters) are skipped.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from t5x_like import storage
from t5x_like.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

Row = tuple[str, str, str]


# --------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: a Hugging Face folder needs {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-export it") from e
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def require_folder(path: str | Path) -> Path:
    path = storage.as_path(path)  # a local folder or gs://
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a Hugging Face folder holding "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    return path


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Float tensors of a .safetensors file as float32 numpy (bf16 too, which numpy lacks).

    Integer buffers some exports carry (e.g. BERT's ``position_ids``) are skipped: they are
    derived from the config, not learned.
    """
    try:
        if storage.is_remote(path):  # object storage: one read through epath, no memory map
            raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        else:
            raw = np.memmap(path, dtype=np.uint8, mode="r")
        (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
        header = json.loads(raw[8:8 + header_len].tobytes())
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e
    data = raw[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] in ("I64", "I32", "I16", "I8", "U8", "BOOL"):
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} in {path} has dtype {info['dtype']}; expected floats")
        begin, end = info["data_offsets"]
        array = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = array.astype(np.float32)
    return tensors


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a folder's model.safetensors (or its sharded index)."""
    path = storage.as_path(path)
    if (path / WEIGHTS_INDEX_FILE).is_file():
        index = read_json(path / WEIGHTS_INDEX_FILE)
        tensors = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (path / shard).is_file():
                raise UserError(f"{path / shard} is missing but {WEIGHTS_INDEX_FILE} lists it")
            tensors.update(_read_safetensors(path / shard))
        return tensors
    if (path / WEIGHTS_FILE).is_file():
        return _read_safetensors(path / WEIGHTS_FILE)
    if any(path.glob("*.bin")):
        raise UserError(
            f"{path} holds only PyTorch *.bin weights (pickles, which t5x-like never loads); "
            f"convert them to {WEIGHTS_FILE} first: AutoModel.from_pretrained(SRC)"
            ".save_pretrained(OUT, safe_serialization=True)")
    raise UserError(f"{path / WEIGHTS_FILE} is missing: export the model with "
                    "save_pretrained(OUT, safe_serialization=True)")


def write_folder(out_dir: str | Path, tensors: dict[str, np.ndarray], hf_config: dict) -> Path:
    """config.json + model.safetensors, as ``save_pretrained`` writes them (to a local folder
    or gs://: each file is one atomic write)."""
    out = storage.as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    storage.write_atomically(out / WEIGHTS_FILE,
                             safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    storage.write_atomically(out / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- layouts


def to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return x
    n_in = int(layout.removeprefix("linear"))
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def from_hf(w: np.ndarray, layout: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    expected = tuple(shape)
    if layout != "same":
        n_in = int(layout.removeprefix("linear"))
        expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if tuple(w.shape) != expected:
        raise UserError(f"tensor {name} has shape {tuple(w.shape)} but config.json implies "
                        f"{expected}; the weights and config.json do not belong together")
    return w if layout == "same" else w.T.reshape(shape)


def flat_params(state: nnx.State) -> dict[str, Any]:
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def expand(
    rows: Iterable[Row], layer_counts: Mapping[str, int], scan_layers: bool, present: set[str]
) -> Iterator[tuple[str, list[str], bool, str]]:
    """Yields (our key, [HF names], stacked, layout); stacked keys take one name per layer."""
    for ours, hf, layout in rows:
        if "{i}" not in ours:
            if ours in present:
                yield ours, [hf], False, layout
            continue
        n = layer_counts[ours.split(".")[0]]
        if scan_layers:
            key = ours.replace(".{i}", "")
            if key in present:
                yield key, [hf.format(i=i) for i in range(n)], True, layout
        else:
            for i in range(n):
                if ours.format(i=i) in present:
                    yield ours.format(i=i), [hf.format(i=i)], False, layout


def params_from_table(
    tensors: dict[str, np.ndarray],
    abstract_state: nnx.State,
    rows: Iterable[Row],
    *,
    layer_counts: Mapping[str, int],
    scan_layers: bool,
    dtype: Any,
    ignored: Iterable[str] = (),
) -> dict:
    """A pure param dict shaped like ``abstract_state`` (as ``nnx.to_pure_dict`` gives).

    Every parameter must be covered by a row, and every tensor used or listed in ``ignored``:
    anything else means the weights and config.json are from different models.
    """
    shapes = {k: v.shape for k, v in flat_params(abstract_state).items()}
    flat, used = {}, set()
    for key, names, stacked, layout in expand(rows, layer_counts, scan_layers, set(shapes)):
        missing = [n for n in names if n not in tensors]
        if missing:
            raise UserError(f"the weights lack tensor {missing[0]}, which config.json implies; "
                            "the weights and config.json do not belong together")
        shape = shapes[key][1:] if stacked else shapes[key]
        arrays = [from_hf(tensors[n], layout, shape, n) for n in names]
        flat[key] = (np.stack(arrays) if stacked else arrays[0]).astype(dtype)
        used.update(names)
    uncovered = set(shapes) - set(flat)
    assert not uncovered, f"the parameter table has no row for {sorted(uncovered)}"
    unexpected = sorted(set(tensors) - used - set(ignored))
    if unexpected:
        raise UserError(f"the weights hold tensors this config does not use, e.g. "
                        f"{unexpected[:3]}; is config.json from the same model?")
    params: dict = {}
    for path, _ in nnx.to_flat_state(abstract_state):
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = flat[".".join(map(str, path))]
    return params


def tensors_from_table(
    state: nnx.State, rows: Iterable[Row], *, layer_counts: Mapping[str, int], scan_layers: bool
) -> dict[str, np.ndarray]:
    """HF tensors (name -> float32 array) from a model's param state."""
    flat = flat_params(state)
    tensors = {}
    for key, names, stacked, layout in expand(rows, layer_counts, scan_layers, set(flat)):
        value = np.asarray(jax.device_get(flat[key][...]), dtype=np.float32)
        for name, array in zip(names, list(value) if stacked else [value], strict=True):
            tensors[name] = to_hf(array, layout)
    return tensors


def merge(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
    return nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))


# --------------------------------------------------------------------------- architecture modules

# HF config key -> (our config field, transformers' default when the key is absent).
ConfigKeys = Mapping[str, tuple[str, Any]]


def fields_from_hf(hf: Mapping[str, Any], keys: ConfigKeys) -> dict[str, Any]:
    """Our config fields from an HF config dict; an absent key takes transformers' default."""
    return {ours: hf.get(key, default) for key, (ours, default) in keys.items()}


def fields_to_hf(config: Any, keys: ConfigKeys) -> dict[str, Any]:
    """The HF config keys of ``keys`` with our config's values."""
    return {key: getattr(config, ours) for key, (ours, _) in keys.items()}


def check_model_type(hf: Mapping[str, Any], model_types: tuple[str, ...]) -> None:
    """UserError unless config.json's ``model_type`` (absent: the first of ours) is ours."""
    model_type = hf.get("model_type", model_types[0])
    if model_type not in model_types:
        raise UserError(f"{CONFIG_FILE} has model_type={model_type!r}, not one of {model_types}")


def check_unsupported(hf: Mapping[str, Any], required: Mapping[str, Any], name: str) -> None:
    """UserError naming the first option config.json sets that our ``name`` cannot express."""
    for key, value in required.items():
        if hf.get(key, value) != value:
            raise UserError(f"{CONFIG_FILE} sets {key}={hf[key]!r}; t5x-like's {name} supports "
                            f"only {key}={value!r}")


def fill_from_alias(tensors: dict[str, np.ndarray], name: str,
                    aliases: Iterable[str]) -> dict[str, np.ndarray]:
    """``tensors`` with ``name`` copied from the first present alias when it is missing: some
    exports keep only a tied copy of a tensor (e.g. an embedding as the output head)."""
    if name in tensors:
        return tensors
    for alias in aliases:
        if alias in tensors:
            return {**tensors, name: tensors[alias]}
    return tensors


def abstract_model(model_class: type, config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """Structure and shapes of ``model_class(config)``'s params, without allocating or
    initialising them."""
    return nnx.split(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))), nnx.Param)


def import_params(tensors: dict[str, np.ndarray], model_class: type, config: Any,
                  rows: Iterable[Row], *, layer_counts: Mapping[str, int],
                  ignored: Iterable[str] = ()) -> dict:
    """A pure param dict for ``model_class(config)`` (as ``nnx.to_pure_dict`` gives) from HF
    tensors named as ``rows`` say, in the config's ``param_dtype`` and layer layout."""
    _, state = abstract_model(model_class, config)
    return params_from_table(tensors, state, rows, layer_counts=layer_counts,
                             scan_layers=config.scan_layers, dtype=np.dtype(config.param_dtype),
                             ignored=ignored)


def export_tensors(model: nnx.Module, config: Any, rows: Iterable[Row], *,
                   layer_counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """HF tensors (name -> float32 array) of ``model``'s params, named as ``rows`` say."""
    return tensors_from_table(nnx.state(model, nnx.Param), rows, layer_counts=layer_counts,
                              scan_layers=config.scan_layers)


def load_model(path: Path, model_class: type, config: Any,
               params_from_hf: Callable[[dict[str, np.ndarray], Any], dict]) -> nnx.Module:
    """``model_class(config)`` holding the folder's weights, converted by ``params_from_hf``."""
    params = params_from_hf(read_weights(path), config)
    return merge(abstract_model(model_class, config)[0], params)
