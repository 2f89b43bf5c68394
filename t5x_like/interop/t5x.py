"""T5X checkpoints <-> t5x-like workdirs: ``import-t5x`` and ``export-t5x``.

A T5X checkpoint is a folder ``checkpoint_STEP/`` holding a msgpack file ``checkpoint``
(``{"version": 3, "optimizer": {"target": params, "state": {"step", "param_states"}}}``, as
``flax.serialization`` writes it) whose large leaves are TensorStore zarr specs pointing at
sibling folders named by the parameter path with dots (``target.encoder.layers_0.mlp.wo.kernel``);
small leaves are stored inline. Parameter names are those of T5X's T5 1.1 network
(``t5x/examples/t5/network.py``); its scanned variant (``examples/scalable_t5``, layers stacked
on axis 1 under ``encoder/encoder``, a relative-position table per layer) is read too.

The import keeps the parameters and the step; T5X's Adafactor state is not mapped (its factored
moments are per 2-D kernel, optax's per 3-D one), so the optimizer starts afresh. The export
writes T5X's T5 1.1 layout with the zero Adafactor state T5X's default ``Adafactor`` expects, so
T5X restores it. The model config is read from the parameter shapes.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.t5 import T5, T5Config

CHECKPOINT_FILE = "checkpoint"
VERSION = 3  # T5X's msgpack layout version since 2021
MIN_DIM_SIZE_TO_FACTOR = 128  # T5X Adafactor's default

# (our parameter path, T5X path, layout); "{i}" is a layer. Layouts: "same"; "kernelK" = our
# kernel [in..., out...] with K input dims, T5X's the same values flattened to 2-D;
# "transpose" = T5X holds the transpose (relative-position table: [heads, buckets]).
_ATTN = (("query", "kernel1"), ("key", "kernel1"), ("value", "kernel1"), ("out", "kernel2"))
_MLP = ("wi", "wi_0", "wi_1", "wo")


def _attention(ours: str, theirs: str) -> list[C.Row]:
    return [(f"{ours}.{n}", f"{theirs}/{n}/kernel", layout) for n, layout in _ATTN]


def _mlp(ours: str, theirs: str) -> list[C.Row]:
    return [(f"{ours}.{n}", f"{theirs}/{n}/kernel", "same") for n in _MLP]


_E, _D = "encoder/layers_{i}", "decoder/layers_{i}"
ROWS: tuple[C.Row, ...] = (
    ("token_embedder.embedding", "token_embedder/embedding", "same"),
    ("lm_head", "decoder/logits_dense/kernel", "same"),
    ("encoder.relpos_bias.embedding", "encoder/relpos_bias/rel_embedding", "transpose"),
    ("encoder.layers.{i}.pre_attention_norm.scale", f"{_E}/pre_attention_layer_norm/scale",
     "same"),
    *_attention("encoder.layers.{i}.attention", f"{_E}/attention"),
    ("encoder.layers.{i}.pre_mlp_norm.scale", f"{_E}/pre_mlp_layer_norm/scale", "same"),
    *_mlp("encoder.layers.{i}.mlp", f"{_E}/mlp"),
    ("encoder.final_norm.scale", "encoder/encoder_norm/scale", "same"),
    ("decoder.relpos_bias.embedding", "decoder/relpos_bias/rel_embedding", "transpose"),
    ("decoder.layers.{i}.pre_self_attention_norm.scale",
     f"{_D}/pre_self_attention_layer_norm/scale", "same"),
    *_attention("decoder.layers.{i}.self_attention", f"{_D}/self_attention"),
    ("decoder.layers.{i}.pre_cross_attention_norm.scale",
     f"{_D}/pre_cross_attention_layer_norm/scale", "same"),
    *_attention("decoder.layers.{i}.cross_attention", f"{_D}/encoder_decoder_attention"),
    ("decoder.layers.{i}.pre_mlp_norm.scale", f"{_D}/pre_mlp_layer_norm/scale", "same"),
    *_mlp("decoder.layers.{i}.mlp", f"{_D}/mlp"),
    ("decoder.final_norm.scale", "decoder/decoder_norm/scale", "same"),
)


# --------------------------------------------------------------------------- reading


def find_checkpoint(path: str | Path) -> Path:
    """The ``checkpoint_STEP`` folder ``path`` names: itself, its ``checkpoint`` file's folder,
    or the newest ``checkpoint_*`` inside a T5X model directory."""
    path = Path(path)
    if path.is_file() and path.name == CHECKPOINT_FILE:
        return path.parent
    if (path / CHECKPOINT_FILE).is_file():
        return path
    steps = sorted((int(p.name.split("_")[-1]), p) for p in path.glob("checkpoint_*")
                   if p.name.split("_")[-1].isdigit() and (p / CHECKPOINT_FILE).is_file())
    if steps:
        return steps[-1][1]
    if path.is_dir() and any(path.glob("_METADATA")) or (path / "_CHECKPOINT_METADATA").exists():
        raise UserError(f"{path} is an orbax-format T5X checkpoint; import-t5x reads T5X's "
                        "msgpack + TensorStore format (a folder with a 'checkpoint' file)")
    raise UserError(f"{path} holds no T5X checkpoint: pass a checkpoint_STEP folder (with a "
                    f"'{CHECKPOINT_FILE}' file) or the model directory that holds them")


def is_t5x_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a T5X checkpoint folder or a T5X model directory holding some."""
    path = Path(path)
    return (path / CHECKPOINT_FILE).is_file() or any(
        (p / CHECKPOINT_FILE).is_file() for p in path.glob("checkpoint_*"))


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, object]]:
    for key, value in tree.items():
        if isinstance(value, dict) and "driver" not in value:
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _read_leaf(value: object, folder: Path, name: str) -> np.ndarray:
    """A msgpack leaf: an inline array, or the TensorStore array its spec points to."""
    if not isinstance(value, dict):
        return np.asarray(value)
    import tensorstore as ts

    spec = dict(value)
    kvstore = dict(spec.get("kvstore", {}))
    if kvstore.get("driver") not in ("file", "gfile"):
        raise UserError(f"array {name} in {folder} is stored with TensorStore driver "
                        f"{kvstore.get('driver')!r}; copy the checkpoint to a local folder first")
    kvstore["driver"] = "file"
    kvstore["path"] = str(folder / kvstore["path"])
    spec["kvstore"] = kvstore
    try:
        return np.asarray(ts.open(spec, open=True).result().read().result())
    except ValueError as e:
        raise UserError(f"array {name} of {folder} cannot be read ({e}); is the checkpoint "
                        "complete?") from e


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], int, bool]:
    """(T5X parameter path -> array, step, whether optimizer moments are present)."""
    from flax import serialization

    folder = find_checkpoint(path)
    try:
        contents = serialization.msgpack_restore((folder / CHECKPOINT_FILE).read_bytes())
    except Exception as e:  # msgpack's errors have no common base: report the file
        raise UserError(f"{folder / CHECKPOINT_FILE} is not a T5X msgpack checkpoint "
                        f"({type(e).__name__}: {e})") from e
    state = contents.get("optimizer") if isinstance(contents, dict) else None
    if not isinstance(state, dict) or "target" not in state:
        raise UserError(f"{folder / CHECKPOINT_FILE} has no optimizer/target section; is it "
                        "a T5X checkpoint of version >= 2?")
    params = {name: _read_leaf(v, folder, name) for name, v in _flatten(state["target"])}
    opt_state = state.get("state", {}) or {}
    step = int(np.asarray(opt_state.get("step", 0)))
    return _unscan(params), step, bool(opt_state.get("param_states"))


def _unscan(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scanned (``{stack}/{stack}/...``, layers on axis 1) and per-layer relative-position
    tables (scalable_t5) rewritten into the T5 1.1 network's unrolled names."""
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        stack = name.split("/")[0]
        if name.startswith(f"{stack}/{stack}/"):  # scanned: split the layer axis (axis 1)
            rest = name[len(stack) * 2 + 2:]
            for i in range(value.shape[1]):
                out[f"{stack}/layers_{i}/{rest}"] = np.take(value, i, axis=1)
        else:
            out[name] = value
    for stack in ("encoder", "decoder"):
        per_layer = sorted((k for k in out if k.startswith(f"{stack}/layers_")
                            and k.endswith("/relpos_bias/rel_embedding")),
                           key=lambda k: int(k.split("/")[1].removeprefix("layers_")))
        if not per_layer:
            continue
        tables = [out.pop(k) for k in per_layer]
        if any(not np.array_equal(tables[0], t) for t in tables[1:]):
            raise UserError(f"the checkpoint's {stack} has a different relative-position table "
                            "in each layer (scalable_t5); t5x-like's T5 shares one per stack")
        out[f"{stack}/relpos_bias/rel_embedding"] = tables[0]
    return out


def config_from_params(params: dict[str, np.ndarray], **fields) -> T5Config:
    """The T5Config the T5X parameter shapes imply (``fields``: our own, e.g. scan_layers)."""
    def need(name: str) -> np.ndarray:
        if name not in params:
            raise UserError(f"the checkpoint has no parameter {name}; import-t5x reads T5X's "
                            "T5 / T5 1.1 encoder-decoder (t5x/examples/t5/network.py)")
        return params[name]

    vocab, d_model = need("token_embedder/embedding").shape
    heads, buckets = need("encoder/relpos_bias/rel_embedding").shape
    inner = need("encoder/layers_0/attention/query/kernel").shape[1]
    gated = "encoder/layers_0/mlp/wi_0/kernel" in params
    d_ff = need(f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel").shape[1]

    def layers(stack: str) -> int:
        return len({k.split("/")[1] for k in params if k.startswith(f"{stack}/layers_")})

    return T5Config.from_dict(dict(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads, d_ff=d_ff,
        num_encoder_layers=layers("encoder"), num_decoder_layers=layers("decoder"),
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings="decoder/logits_dense/kernel" not in params, **fields))


def _to_ours(x: np.ndarray, layout: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    if layout == "transpose":
        x = x.T
    if math.prod(x.shape) != math.prod(shape) or (layout != "kernel2" and layout != "kernel1"
                                                   and tuple(x.shape) != tuple(shape)):
        raise UserError(f"T5X parameter {name} has shape {tuple(x.shape)} but the model it "
                        f"implies needs {tuple(shape)}; the checkpoint is not a T5 1.1 network")
    return x.reshape(shape)


def _to_t5x(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transpose":
        return x.T
    if layout.startswith("kernel"):
        k = int(layout.removeprefix("kernel"))
        return x.reshape(math.prod(x.shape[:k]), -1)
    return x


def params_for(t5x_params: dict[str, np.ndarray], config: T5Config) -> dict:
    """A pure param dict for ``T5(config)`` from T5X parameters; every one must be used."""
    _, abstract = C.abstract_model(T5, config)
    shapes = {k: v.shape for k, v in C.flat_params(abstract).items()}
    counts = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    flat, used = {}, set()
    for key, names, stacked, layout in C.expand(ROWS, counts, config.scan_layers, set(shapes)):
        shape = shapes[key][1:] if stacked else shapes[key]
        missing = [n for n in names if n not in t5x_params]
        if missing:
            raise UserError(f"the checkpoint lacks parameter {missing[0]}, which its other "
                            "shapes imply")
        arrays = [_to_ours(t5x_params[n], layout, shape, n) for n in names]
        flat[key] = (np.stack(arrays) if stacked else arrays[0]).astype(config.param_dtype)
        used.update(names)
    unused = sorted(set(t5x_params) - used)
    if unused:
        raise UserError(f"the checkpoint holds parameters t5x-like's T5 has no place for, e.g. "
                        f"{unused[:3]}")
    params: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return params


def t5x_params(params: dict, config: T5Config) -> dict[str, np.ndarray]:
    """T5X parameter path -> float32 array (T5 1.1 network layout) from our pure params."""
    from flax import nnx

    graphdef, _ = C.abstract_model(T5, config)
    state = nnx.state(C.merge(graphdef, params), nnx.Param)
    flat = C.flat_params(state)
    counts = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    out = {}
    for key, names, stacked, layout in C.expand(ROWS, counts, config.scan_layers, set(flat)):
        value = np.asarray(jax.device_get(flat[key][...]), dtype=np.float32)
        for name, array in zip(names, list(value) if stacked else [value], strict=True):
            out[name] = _to_t5x(array, layout)
    return out


# --------------------------------------------------------------------------- writing


def _adafactor_zero_state(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """T5X's ``Adafactor.init_param_state`` for its defaults (factored, beta1 None)."""
    state = {k: np.zeros((1,), np.float32) for k in ("v_row", "v_col", "v", "m")}
    order = np.argsort(shape)
    if len(shape) >= 2 and shape[order[-2]] >= MIN_DIM_SIZE_TO_FACTOR:
        d1, d0 = int(order[-2]), int(order[-1])
        state["v_row"] = np.zeros(np.delete(shape, d0), np.float32)
        state["v_col"] = np.zeros(np.delete(shape, d1), np.float32)
    else:
        state["v"] = np.zeros(shape, np.float32)
    return state


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def write_checkpoint(params: dict[str, np.ndarray], step: int, out_dir: str | Path) -> Path:
    """``out_dir/checkpoint_STEP`` in T5X's format; arrays larger than one element go to
    TensorStore zarr folders (gzip), as T5X's ``Checkpointer`` writes them."""
    import tensorstore as ts
    from flax import serialization

    folder = Path(out_dir) / f"checkpoint_{step}"
    if folder.exists():
        raise UserError(f"{folder} exists; choose an empty output folder")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def store(name: str, array: np.ndarray) -> object:
        if array.size <= 1:
            return array
        spec = {"driver": "zarr", "dtype": array.dtype.name,
                "kvstore": {"driver": "file", "path": name.replace("/", ".")},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(array.shape),
                             "chunks": list(array.shape)}}
        local = {**spec, "kvstore": {"driver": "file", "path": str(tmp / name.replace("/", "."))}}
        ts.open(local, create=True, open=True).result().write(array).result()
        return spec

    target = {n: store(f"target/{n}", a) for n, a in params.items()}
    moments = {f"{n}/{k}": store(f"state/param_states/{n}/{k}", v)
               for n, a in params.items() for k, v in _adafactor_zero_state(a.shape).items()}
    contents = {"version": VERSION, "optimizer": {
        "target": _nest(target),
        "state": {"step": np.asarray(step, np.int32), "param_states": _nest(moments)}}}
    (tmp / CHECKPOINT_FILE).write_bytes(serialization.msgpack_serialize(contents))
    tmp.rename(folder)
    return folder


# --------------------------------------------------------------------------- workdirs


def import_t5x(src: str | Path, out: str | Path, overrides=()) -> Path:
    """Writes ``out/config.json`` and ``out/checkpoints/0`` (an ordinary workdir at step 0,
    like import-hf's) from a T5X checkpoint; ``overrides`` are ``model.scan_layers=True`` etc."""
    import dataclasses

    from t5x_like import config as config_lib
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.experiment import build

    out = Path(out)
    if (out / "checkpoints").exists():
        raise UserError(f"{out} already holds checkpoints; choose an empty output folder")
    params, step, has_moments = read_checkpoint(src)
    config = config_lib.base_config("t5")
    with config.model.unlocked():
        config.model.update(dataclasses.asdict(config_from_params(params)))
    config_lib.apply_overrides(config, [o.removeprefix("--") for o in overrides])
    config_lib.validate(config)
    model_config = T5Config.from_dict(config.model.to_dict())
    if any(getattr(model_config, f) != getattr(config_from_params(params), f)
           for f in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_encoder_layers",
                     "num_decoder_layers", "feed_forward_proj", "tie_word_embeddings")):
        raise UserError("the overrides change the model's shape, which the checkpoint fixes; "
                        "override only fields such as model.scan_layers or model.dropout_rate")
    ours = params_for(params, model_config)
    exp = build(config)
    state = exp.init_state()
    imported = jax.device_put(ours, exp.state_shardings["params"])
    state = {**state, "params": imported, "opt_state": exp.tx.init(imported)}
    out.mkdir(parents=True, exist_ok=True)
    exp.write_config(out)
    checkpoints = Checkpoints(out)
    checkpoints.save(0, state, {"batches_consumed": 0, "step": 0, "imported_from": str(src),
                                "t5x_step": step})
    checkpoints.close()
    if has_moments:
        print(f"note: T5X's optimizer state at step {step} is not carried over; training from "
              f"{out} starts Adafactor afresh at step 0")
    if not config.data.vocab_path:
        print("note: set --config.data.vocab_path to the checkpoint's SentencePiece model "
              "(T5 1.1: cc_all.32000.100extra) before training or evaluating")
    return out


def export_t5x(workdir: str | Path, out: str | Path) -> Path:
    """Writes ``out/checkpoint_STEP`` in T5X's format from a T5 workdir's newest checkpoint."""
    from t5x_like.evaluation.driver import load_checkpoint

    exp, params, step = load_checkpoint(workdir)
    model_config = exp.family.model_config
    if not isinstance(model_config, T5Config):
        raise UserError(f"{workdir} holds a {exp.config.family} model; export-t5x writes T5 "
                        "encoder-decoders only")
    return write_checkpoint(t5x_params(jax.device_get(params), model_config), step, out)
