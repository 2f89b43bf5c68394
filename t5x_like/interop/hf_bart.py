"""Hugging Face BART (``BartForConditionalGeneration``, or ``BartModel`` weights) <-> our Bart.

Tensor names carry a ``model.`` prefix in BartForConditionalGeneration and none in BartModel;
import accepts both. q/k/v biases are [d_model] in transformers and [heads, d_kv] here, and
``final_logits_bias`` is [1, vocab] there and [vocab] here: reshaped on the way in and out, so
round trips are bitwise exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.bart import Bart, BartConfig

MODEL_TYPES = ("bart",)
MODEL_CLASS = Bart
CONFIG_CLASS = BartConfig

_ATTN = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))


def _attention_rows(ours: str, hf: str) -> list[C.Row]:
    return [
        *[(f"{ours}.{a}", f"{hf}.{b}.weight", "linear1") for a, b in _ATTN],
        *[(f"{ours}.{a}_bias", f"{hf}.{b}.bias", "same") for a, b in _ATTN],
        (f"{ours}.out", f"{hf}.out_proj.weight", "linear2"),
        (f"{ours}.out_bias", f"{hf}.out_proj.bias", "same"),
    ]


def _norm_rows(ours: str, hf: str) -> list[C.Row]:
    return [(f"{ours}.scale", f"{hf}.weight", "same"), (f"{ours}.bias", f"{hf}.bias", "same")]


def _stack_rows(stack: str) -> list[C.Row]:
    hf = f"model.{stack}"
    layer, hf_layer = f"{stack}.layers.{{i}}", f"{hf}.layers.{{i}}"
    cross = [*_attention_rows(f"{layer}.cross_attention", f"{hf_layer}.encoder_attn"),
             *_norm_rows(f"{layer}.cross_attention_norm", f"{hf_layer}.encoder_attn_layer_norm")]
    return [
        (f"{stack}.position_embedding", f"{hf}.embed_positions.weight", "same"),
        *_norm_rows(f"{stack}.embedding_norm", f"{hf}.layernorm_embedding"),
        *_attention_rows(f"{layer}.self_attention", f"{hf_layer}.self_attn"),
        *_norm_rows(f"{layer}.self_attention_norm", f"{hf_layer}.self_attn_layer_norm"),
        *(cross if stack == "decoder" else []),
        (f"{layer}.mlp.wi", f"{hf_layer}.fc1.weight", "linear1"),
        (f"{layer}.mlp.wi_bias", f"{hf_layer}.fc1.bias", "same"),
        (f"{layer}.mlp.wo", f"{hf_layer}.fc2.weight", "linear1"),
        (f"{layer}.mlp.wo_bias", f"{hf_layer}.fc2.bias", "same"),
        *_norm_rows(f"{layer}.mlp_norm", f"{hf_layer}.final_layer_norm"),
    ]


BART_PARAMS: tuple[C.Row, ...] = (
    ("token_embedding", "model.shared.weight", "same"),
    ("final_logits_bias", "final_logits_bias", "same"),
    *_stack_rows("encoder"),
    *_stack_rows("decoder"),
)
# Copies of model.shared.weight that transformers may also store; equal when tied, not read.
_TIED_ALIASES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                 "lm_head.weight")
_QKV_BIAS = re.compile(r"\.(q_proj|k_proj|v_proj)\.bias$")

# HF config key -> (our field, transformers' BartConfig default when the key is absent).
_CONFIG_KEYS = {
    "vocab_size": ("vocab_size", 50265),
    "d_model": ("d_model", 1024),
    "encoder_attention_heads": ("num_heads", 16),
    "encoder_ffn_dim": ("d_ff", 4096),
    "encoder_layers": ("num_encoder_layers", 12),
    "decoder_layers": ("num_decoder_layers", 12),
    "max_position_embeddings": ("max_position_embeddings", 1024),
    "activation_function": ("activation", "gelu"),
    "scale_embedding": ("scale_embedding", False),
    "dropout": ("dropout_rate", 0.1),
    "attention_dropout": ("attention_dropout_rate", 0.0),
    "activation_dropout": ("activation_dropout_rate", 0.0),
    "init_std": ("init_std", 0.02),
    "pad_token_id": ("pad_token_id", 1),
    "decoder_start_token_id": ("decoder_start_token_id", 2),
}
# Keys our single num_heads / d_ff must agree with, and options our module does not implement.
_SAME_AS = {"decoder_attention_heads": "encoder_attention_heads",
            "decoder_ffn_dim": "encoder_ffn_dim"}
_UNSUPPORTED = {"tie_word_embeddings": True, "add_final_layer_norm": False,
                "normalize_before": False, "normalize_embedding": True}


def config_from_hf(hf: dict, **overrides: Any) -> BartConfig:
    """Our BartConfig from a transformers BART config dict (+ our own fields)."""
    model_type = hf.get("model_type", "bart")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{C.CONFIG_FILE} has model_type={model_type!r}, not one of {MODEL_TYPES}")
    fields = {ours: hf.get(key, default) for key, (ours, default) in _CONFIG_KEYS.items()}
    for key, same in _SAME_AS.items():
        base = hf.get(same, _CONFIG_KEYS[same][1])
        if hf.get(key, base) != base:
            raise UserError(f"{C.CONFIG_FILE} has {key}={hf[key]} != {same}; t5x-like's BART "
                            "uses one value for encoder and decoder")
    for key, required in _UNSUPPORTED.items():
        if hf.get(key, required) != required:
            raise UserError(f"{C.CONFIG_FILE} sets {key}={hf[key]!r}; t5x-like's BART supports "
                            f"only {key}={required!r}")
    return BartConfig.from_dict({**fields, **overrides})


def config_to_hf(config: BartConfig) -> dict:
    """A transformers ``BartConfig`` dict for ``BartForConditionalGeneration``."""
    hf = {key: getattr(config, ours) for key, (ours, _) in _CONFIG_KEYS.items()}
    return {
        "architectures": ["BartForConditionalGeneration"],
        "model_type": "bart",
        **hf,
        "decoder_attention_heads": config.num_heads,
        "decoder_ffn_dim": config.d_ff,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _layer_counts(config: BartConfig) -> dict[str, int]:
    return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


def _abstract(config: BartConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Bart(config, rngs=nnx.Rngs(0))), nnx.Param)


def _to_ours(tensors: dict[str, np.ndarray], config: BartConfig) -> dict:
    """HF names with the ``model.`` prefix, our bias shapes; a missing final_logits_bias
    (BartModel) is zeros, as transformers initialises it."""
    out = {}
    for name, value in tensors.items():
        if not name.startswith(("model.", "final_logits_bias", "lm_head.")):
            name = "model." + name
        if _QKV_BIAS.search(name) and value.shape == (config.d_model,):
            value = value.reshape(config.num_heads, config.d_kv)
        out[name] = value
    bias = out.get("final_logits_bias", np.zeros((1, config.vocab_size), np.float32))
    out["final_logits_bias"] = bias.reshape(-1) if bias.ndim == 2 and bias.shape[0] == 1 else bias
    if "model.shared.weight" not in out:
        for alias in _TIED_ALIASES[:2]:
            if alias in out:
                out["model.shared.weight"] = out[alias]
                break
    return out


def params_from_hf(tensors: dict, config: BartConfig) -> dict:
    """A pure param dict for ``Bart(config)`` (as ``nnx.to_pure_dict`` gives) from HF tensors."""
    _, state = _abstract(config)
    return C.params_from_table(
        _to_ours(tensors, config), state, BART_PARAMS, layer_counts=_layer_counts(config),
        scan_layers=config.scan_layers, dtype=jax.numpy.dtype(config.param_dtype),
        ignored=_TIED_ALIASES)


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[Bart, BartConfig]:
    config = config_from_hf(hf_config, **overrides)
    params = params_from_hf(C.read_weights(path), config)
    return C.merge(_abstract(config)[0], params), config


def export(model: Bart, config: BartConfig, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that ``BartForConditionalGeneration`` loads."""
    tensors = C.tensors_from_table(nnx.state(model, nnx.Param), BART_PARAMS,
                                   layer_counts=_layer_counts(config),
                                   scan_layers=config.scan_layers)
    for name, value in tensors.items():
        if _QKV_BIAS.search(name):
            tensors[name] = value.reshape(-1)
    tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(1, -1)
    return C.write_folder(out_dir, tensors, config_to_hf(config))
