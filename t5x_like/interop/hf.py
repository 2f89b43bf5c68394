"""Hugging Face T5 checkpoints (config.json + safetensors) <-> our T5.

One table, ``T5_PARAMS``, says where every parameter lives on each side and how its layout
differs; ``load`` and ``export`` both walk it, so they cannot disagree. Other families follow
the same pattern with their own table. Weights are read from safetensors only (a parsed header
and raw bytes, never pickle); a ``pytorch_model.bin`` is refused with the command that converts it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models.t5 import FEED_FORWARD_PROJ, T5, T5Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# (our parameter path, HF tensor name, layout). "{i}" is a layer index: in our path it names
# an element of a layer list (scan_layers=False) or, when layers are scanned, disappears and
# becomes the leading axis of a stacked array. Layouts: "same" = identical array; "linearK" =
# our kernel is [in..., out...] with K input dims, HF's torch Linear weight is [out, in] with
# the dims flattened. Rows whose our-path the model lacks (wi vs wi_0/wi_1, lm_head when tied)
# are skipped.
_ATTN = (("query", "q", "linear1"), ("key", "k", "linear1"), ("value", "v", "linear1"),
         ("out", "o", "linear2"))
_MLP = (("wi", "wi"), ("wi_0", "wi_0"), ("wi_1", "wi_1"), ("wo", "wo"))


def _attention_rows(ours: str, hf: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}.{a}", f"{hf}.{b}.weight", layout) for a, b, layout in _ATTN]


def _mlp_rows(ours: str, hf: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}.{a}", f"{hf}.DenseReluDense.{b}.weight", "linear1") for a, b in _MLP]


_ENC, _DEC = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
T5_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("token_embedder.embedding", "shared.weight", "same"),
    ("lm_head", "lm_head.weight", "linear1"),
    ("encoder.relpos_bias.embedding",
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same"),
    ("encoder.layers.{i}.pre_attention_norm.scale", f"{_ENC}.0.layer_norm.weight", "same"),
    *_attention_rows("encoder.layers.{i}.attention", f"{_ENC}.0.SelfAttention"),
    ("encoder.layers.{i}.pre_mlp_norm.scale", f"{_ENC}.1.layer_norm.weight", "same"),
    *_mlp_rows("encoder.layers.{i}.mlp", f"{_ENC}.1"),
    ("encoder.final_norm.scale", "encoder.final_layer_norm.weight", "same"),
    ("decoder.relpos_bias.embedding",
     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same"),
    ("decoder.layers.{i}.pre_self_attention_norm.scale", f"{_DEC}.0.layer_norm.weight", "same"),
    *_attention_rows("decoder.layers.{i}.self_attention", f"{_DEC}.0.SelfAttention"),
    ("decoder.layers.{i}.pre_cross_attention_norm.scale", f"{_DEC}.1.layer_norm.weight", "same"),
    *_attention_rows("decoder.layers.{i}.cross_attention", f"{_DEC}.1.EncDecAttention"),
    ("decoder.layers.{i}.pre_mlp_norm.scale", f"{_DEC}.2.layer_norm.weight", "same"),
    *_mlp_rows("decoder.layers.{i}.mlp", f"{_DEC}.2"),
    ("decoder.final_norm.scale", "decoder.final_layer_norm.weight", "same"),
)
# Copies of shared.weight that transformers may also store; equal by construction, not read.
_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")

# HF config key -> (our field, HF's default when the key is absent, as in transformers' T5Config).
_CONFIG_KEYS = {
    "vocab_size": ("vocab_size", 32128),
    "d_model": ("d_model", 512),
    "d_kv": ("d_kv", 64),
    "num_heads": ("num_heads", 8),
    "d_ff": ("d_ff", 2048),
    "num_layers": ("num_encoder_layers", 6),
    "num_decoder_layers": ("num_decoder_layers", None),  # None: same as num_layers
    "relative_attention_num_buckets": ("relative_attention_num_buckets", 32),
    "relative_attention_max_distance": ("relative_attention_max_distance", 128),
    "dropout_rate": ("dropout_rate", 0.1),
    "layer_norm_epsilon": ("layer_norm_epsilon", 1e-6),
    "feed_forward_proj": ("feed_forward_proj", "relu"),
    "tie_word_embeddings": ("tie_word_embeddings", True),
}
_MODEL_TYPES = ("t5", "mt5")  # mT5 is T5 v1.1 with a larger vocabulary


# --------------------------------------------------------------------------- layouts


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return x
    n_in = int(layout.removeprefix("linear"))
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def _from_hf(w: np.ndarray, layout: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    expected = tuple(shape)
    if layout != "same":
        n_in = int(layout.removeprefix("linear"))
        expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if tuple(w.shape) != expected:
        raise UserError(f"tensor {name} has shape {tuple(w.shape)} but config.json implies "
                        f"{expected}; the weights and config.json do not belong together")
    return w if layout == "same" else w.T.reshape(shape)


def _expand(config: T5Config, present: set[str]):
    """Yields (our key, [HF names], stacked, layout); stacked keys take one name per layer."""
    counts = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    for ours, hf, layout in T5_PARAMS:
        if "{i}" not in ours:
            if ours in present:
                yield ours, [hf], False, layout
            continue
        n = counts[ours.split(".")[0]]
        if config.scan_layers:
            key = ours.replace(".{i}", "")
            if key in present:
                yield key, [hf.format(i=i) for i in range(n)], True, layout
        else:
            for i in range(n):
                if ours.format(i=i) in present:
                    yield ours.format(i=i), [hf.format(i=i)], False, layout


def _flat_params(state: nnx.State) -> dict[str, Any]:
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


# --------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: a Hugging Face T5 folder needs {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-export it") from e
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def config_from_hf(hf: dict, **overrides: Any) -> T5Config:
    """Our T5Config from a transformers T5 config dict (+ our own fields, e.g. scan_layers)."""
    model_type = hf.get("model_type", "t5")
    if model_type not in _MODEL_TYPES:
        raise UserError(f"{CONFIG_FILE} has model_type={model_type!r}; only {_MODEL_TYPES} "
                        "checkpoints can be imported")
    fields = {ours: hf.get(key, default) for key, (ours, default) in _CONFIG_KEYS.items()}
    if fields["num_decoder_layers"] is None:
        fields["num_decoder_layers"] = fields["num_encoder_layers"]
    if fields["feed_forward_proj"] not in FEED_FORWARD_PROJ:
        raise UserError(f"{CONFIG_FILE} has feed_forward_proj={fields['feed_forward_proj']!r}; "
                        f"supported: {FEED_FORWARD_PROJ}")
    return T5Config.from_dict({**fields, **overrides})


def config_to_hf(config: T5Config) -> dict:
    """A transformers ``T5Config`` dict for ``T5ForConditionalGeneration``."""
    hf = {key: getattr(config, ours) for key, (ours, _) in _CONFIG_KEYS.items()}
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        **hf,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    }


def read_config(path: str | Path, **overrides: Any) -> T5Config:
    """The T5Config of a Hugging Face folder's config.json."""
    return config_from_hf(_read_json(Path(path) / CONFIG_FILE), **overrides)


# --------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Float tensors of a .safetensors file as float32 numpy (bf16 too, which numpy lacks)."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
        header = json.loads(raw[8:8 + header_len].tobytes())
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e
    data = raw[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name} in {path} has dtype {info['dtype']}; expected floats")
        begin, end = info["data_offsets"]
        array = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = array.astype(np.float32)
    return tensors


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a folder's model.safetensors (or its sharded index)."""
    path = Path(path)
    if (path / WEIGHTS_INDEX_FILE).is_file():
        index = _read_json(path / WEIGHTS_INDEX_FILE)
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
            f"convert them to {WEIGHTS_FILE} first: T5ForConditionalGeneration.from_pretrained(SRC)"
            ".save_pretrained(OUT, safe_serialization=True)")
    raise UserError(f"{path / WEIGHTS_FILE} is missing: export the model with "
                    "save_pretrained(OUT, safe_serialization=True)")


# --------------------------------------------------------------------------- load / export


def _abstract(config: T5Config) -> tuple[nnx.GraphDef, nnx.State]:
    """Structure and shapes of ``T5(config)``'s params, without allocating or initialising."""
    return nnx.split(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))), nnx.Param)


def params_from_hf(tensors: dict[str, np.ndarray], config: T5Config) -> dict:
    """A pure param dict for ``T5(config)`` (as ``nnx.to_pure_dict`` gives) from HF tensors."""
    _, state = _abstract(config)
    if "shared.weight" not in tensors:  # some exports keep a tied copy instead
        for alias in _TIED_ALIASES[:2]:
            if alias in tensors:
                tensors = {**tensors, "shared.weight": tensors[alias]}
                break
    shapes = {k: v.shape for k, v in _flat_params(state).items()}
    dtype = jax.numpy.dtype(config.param_dtype)
    flat, used = {}, set()
    for key, names, stacked, layout in _expand(config, set(shapes)):
        missing = [n for n in names if n not in tensors]
        if missing:
            raise UserError(f"the weights lack tensor {missing[0]}, which config.json implies; "
                            "the weights and config.json do not belong together")
        shape = shapes[key][1:] if stacked else shapes[key]
        arrays = [_from_hf(tensors[n], layout, shape, n) for n in names]
        flat[key] = (np.stack(arrays) if stacked else arrays[0]).astype(dtype)
        used.update(names)
    uncovered = set(shapes) - set(flat)
    assert not uncovered, f"T5_PARAMS has no row for {sorted(uncovered)}"
    unexpected = sorted(set(tensors) - used - set(_TIED_ALIASES))
    if unexpected:
        raise UserError(f"the weights hold tensors this T5 config does not use, e.g. "
                        f"{unexpected[:3]}; is config.json from the same model?")
    params: dict = {}
    for path, _ in nnx.to_flat_state(state):
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = flat[".".join(map(str, path))]
    return params


def load(path: str | Path, **overrides: Any) -> tuple[T5, T5Config]:
    """(model, config) from a transformers T5 folder; ``overrides`` set our own fields
    (``scan_layers``, ``dtype``, ``remat_policy``, ...)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a Hugging Face T5 folder holding "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_config(path, **overrides)
    params = params_from_hf(read_weights(path), config)
    graphdef, _ = _abstract(config)
    return nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params)), config


def export(model: T5, config: T5Config, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that ``T5ForConditionalGeneration`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = _flat_params(nnx.state(model, nnx.Param))
    tensors = {}
    for key, names, stacked, layout in _expand(config, set(flat)):
        value = np.asarray(jax.device_get(flat[key][...]), dtype=np.float32)
        for name, array in zip(names, list(value) if stacked else [value], strict=True):
            tensors[name] = np.ascontiguousarray(_to_hf(array, layout))
    safetensors.numpy.save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    return out
