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

import numpy as np

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
_CONFIG_KEYS: C.ConfigKeys = {
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
    C.check_model_type(hf, MODEL_TYPES)
    fields = C.fields_from_hf(hf, _CONFIG_KEYS)
    for key, same in _SAME_AS.items():
        base = hf.get(same, _CONFIG_KEYS[same][1])
        if hf.get(key, base) != base:
            raise UserError(f"{C.CONFIG_FILE} has {key}={hf[key]} != {same}; t5x-like's BART "
                            "uses one value for encoder and decoder")
    C.check_unsupported(hf, _UNSUPPORTED, "BART")
    return BartConfig.from_dict({**fields, **overrides})


def config_to_hf(config: BartConfig) -> dict:
    """A transformers ``BartConfig`` dict for ``BartForConditionalGeneration``."""
    return {
        "architectures": ["BartForConditionalGeneration"],
        "model_type": "bart",
        **C.fields_to_hf(config, _CONFIG_KEYS),
        "decoder_attention_heads": config.num_heads,
        "decoder_ffn_dim": config.d_ff,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _layer_counts(config: BartConfig) -> dict[str, int]:
    return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


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
    return C.fill_from_alias(out, "model.shared.weight", _TIED_ALIASES[:2])


def params_from_hf(tensors: dict, config: BartConfig) -> dict:
    """A pure param dict for ``Bart(config)`` (as ``nnx.to_pure_dict`` gives) from HF tensors."""
    return C.import_params(_to_ours(tensors, config), Bart, config, BART_PARAMS,
                           layer_counts=_layer_counts(config), ignored=_TIED_ALIASES)


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[Bart, BartConfig]:
    config = config_from_hf(hf_config, **overrides)
    return C.load_model(path, Bart, config, params_from_hf), config


def export(model: Bart, config: BartConfig, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that ``BartForConditionalGeneration`` loads."""
    tensors = C.export_tensors(model, config, BART_PARAMS, layer_counts=_layer_counts(config))
    for name, value in tensors.items():
        if _QKV_BIAS.search(name):
            tensors[name] = value.reshape(-1)
    tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(1, -1)
    return C.write_folder(out_dir, tensors, config_to_hf(config))
