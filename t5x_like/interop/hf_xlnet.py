"""Hugging Face XLNet (``XLNetLMHeadModel``) <-> our XLNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.xlnet import FF_ACTIVATIONS, XLNet, XLNetConfig

MODEL_TYPES = ("xlnet",)
MODEL_CLASS = XLNet
CONFIG_CLASS = XLNetConfig

_LAYER, _OURS = "transformer.layer.{i}", "layers.{i}"
_ATTN = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"), ("position", "r"),
         ("r_w_bias", "r_w_bias"), ("r_r_bias", "r_r_bias"), ("r_s_bias", "r_s_bias"),
         ("seg_embed", "seg_embed"))
XLNET_PARAMS: tuple[C.Row, ...] = (
    ("word_embedding", "transformer.word_embedding.weight", "same"),
    ("mask_emb", "transformer.mask_emb", "same"),  # HF stores it [1, 1, d_model]; see below
    ("lm_bias", "lm_loss.bias", "same"),
    *((f"{_OURS}.attention.{a}", f"{_LAYER}.rel_attn.{b}", "same") for a, b in _ATTN),
    (f"{_OURS}.attention_norm.scale", f"{_LAYER}.rel_attn.layer_norm.weight", "same"),
    (f"{_OURS}.attention_norm.bias", f"{_LAYER}.rel_attn.layer_norm.bias", "same"),
    (f"{_OURS}.mlp.wi", f"{_LAYER}.ff.layer_1.weight", "linear1"),
    (f"{_OURS}.mlp.bi", f"{_LAYER}.ff.layer_1.bias", "same"),
    (f"{_OURS}.mlp.wo", f"{_LAYER}.ff.layer_2.weight", "linear1"),
    (f"{_OURS}.mlp.bo", f"{_LAYER}.ff.layer_2.bias", "same"),
    (f"{_OURS}.mlp_norm.scale", f"{_LAYER}.ff.layer_norm.weight", "same"),
    (f"{_OURS}.mlp_norm.bias", f"{_LAYER}.ff.layer_norm.bias", "same"),
)
_MASK_EMB = "transformer.mask_emb"
_TIED_ALIASES = ("lm_loss.weight",)  # a copy of the word embedding (tied), not read

# HF config key -> (our field, transformers' default when the key is absent).
_CONFIG_KEYS: C.ConfigKeys = {
    "vocab_size": ("vocab_size", 32000),
    "d_model": ("d_model", 1024),
    "n_head": ("num_heads", 16),
    "n_layer": ("num_layers", 24),
    "d_inner": ("d_ff", 4096),
    "ff_activation": ("ff_activation", "gelu"),
    "attn_type": ("attn_type", "bi"),
    "mem_len": ("mem_len", 512),
    "reuse_len": ("reuse_len", None),
    "clamp_len": ("clamp_len", -1),
    "dropout": ("dropout_rate", 0.1),
    "layer_norm_eps": ("layer_norm_epsilon", 1e-12),
    "initializer_range": ("initializer_range", 0.02),
}


def config_from_hf(hf: dict, **overrides: Any) -> XLNetConfig:
    """Our XLNetConfig from a transformers XLNet config dict (+ our own fields)."""
    if hf.get("model_type", "xlnet") not in MODEL_TYPES:
        raise UserError(f"{C.CONFIG_FILE} has model_type={hf.get('model_type')!r}, not xlnet")
    if hf.get("bi_data", False):
        raise UserError(f"{C.CONFIG_FILE} sets bi_data=true (forward and backward relative "
                        "encodings per half batch), which t5x-like's XLNet does not implement")
    if not hf.get("tie_word_embeddings", True):
        raise UserError(f"{C.CONFIG_FILE} sets tie_word_embeddings=false; t5x-like's XLNet "
                        "always ties lm_loss.weight to the word embedding")
    fields = C.fields_from_hf(hf, _CONFIG_KEYS)
    fields["mem_len"] = fields["mem_len"] or 0  # transformers' None = ours 0
    fields["reuse_len"] = fields["reuse_len"] or 0
    if fields["ff_activation"] not in FF_ACTIVATIONS:
        raise UserError(f"{C.CONFIG_FILE} has ff_activation={fields['ff_activation']!r}; "
                        f"supported: {', '.join(FF_ACTIVATIONS)}")
    return XLNetConfig.from_dict({**fields, **overrides})


def config_to_hf(config: XLNetConfig) -> dict:
    """A transformers ``XLNetConfig`` dict for ``XLNetLMHeadModel``."""
    hf = C.fields_to_hf(config, _CONFIG_KEYS)
    hf["mem_len"] = config.mem_len or None
    hf["reuse_len"] = config.reuse_len or None
    return {
        "architectures": ["XLNetLMHeadModel"],
        "model_type": "xlnet",
        **hf,
        "d_head": config.d_head,
        "untie_r": True,
        "bi_data": False,
        "same_length": False,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 5,
        "torch_dtype": "float32",
    }


def _layer_counts(config: XLNetConfig) -> dict[str, int]:
    return {"layers": config.num_layers}


def params_from_hf(tensors: dict, config: XLNetConfig) -> dict:
    """A pure param dict for ``XLNet(config)`` from HF tensors."""
    if _MASK_EMB in tensors:
        tensors = {**tensors, _MASK_EMB: tensors[_MASK_EMB].reshape(-1)}
    return C.import_params(tensors, XLNet, config, XLNET_PARAMS,
                           layer_counts=_layer_counts(config), ignored=_TIED_ALIASES)


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[XLNet, XLNetConfig]:
    config = config_from_hf(hf_config, **overrides)
    return C.load_model(path, XLNet, config, params_from_hf), config


def export(model: XLNet, config: XLNetConfig, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that ``XLNetLMHeadModel`` loads."""
    tensors = C.export_tensors(model, config, XLNET_PARAMS, layer_counts=_layer_counts(config))
    tensors[_MASK_EMB] = tensors[_MASK_EMB].reshape(1, 1, -1)
    return C.write_folder(out_dir, tensors, config_to_hf(config))
