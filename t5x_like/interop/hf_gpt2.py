"""Hugging Face GPT-2 (``GPT2LMHeadModel``, or ``GPT2Model`` weights) <-> our DecoderLM.

GPT-2 stores its projections as ``Conv1D`` weights [in, out] (not torch Linear's [out, in]) and
fuses q/k/v into one ``c_attn`` [d, 3d]. Import rewrites those tensors into per-projection,
Linear-layout ones (names ending ``attn.q.weight`` etc.) so one table of rows describes the
checkpoint, as in hf_t5.py; export writes the table's tensors and fuses them back. Both ways
are transposes, splits and concatenations only, so round trips are bitwise exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.decoder_lm import DecoderLM, DecoderLMConfig

MODEL_TYPES = ("gpt2",)
MODEL_CLASS = DecoderLM
CONFIG_CLASS = DecoderLMConfig

_H = "transformer.h.{i}"
GPT2_PARAMS: tuple[C.Row, ...] = (
    ("token_embedding", "transformer.wte.weight", "same"),
    ("position_embedding", "transformer.wpe.weight", "same"),
    ("layers.{i}.pre_attention_norm.scale", f"{_H}.ln_1.weight", "same"),
    ("layers.{i}.pre_attention_norm.bias", f"{_H}.ln_1.bias", "same"),
    *[(f"layers.{{i}}.attention.{ours}", f"{_H}.attn.{hf}.weight", "linear1")
      for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))],
    *[(f"layers.{{i}}.attention.{ours}_bias", f"{_H}.attn.{hf}.bias", "same")
      for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))],
    ("layers.{i}.attention.out", f"{_H}.attn.c_proj.weight", "linear2"),
    ("layers.{i}.attention.out_bias", f"{_H}.attn.c_proj.bias", "same"),
    ("layers.{i}.pre_mlp_norm.scale", f"{_H}.ln_2.weight", "same"),
    ("layers.{i}.pre_mlp_norm.bias", f"{_H}.ln_2.bias", "same"),
    ("layers.{i}.mlp.wi", f"{_H}.mlp.c_fc.weight", "linear1"),
    ("layers.{i}.mlp.wi_bias", f"{_H}.mlp.c_fc.bias", "same"),
    ("layers.{i}.mlp.wo", f"{_H}.mlp.c_proj.weight", "linear1"),
    ("layers.{i}.mlp.wo_bias", f"{_H}.mlp.c_proj.bias", "same"),
    ("final_norm.scale", "transformer.ln_f.weight", "same"),
    ("final_norm.bias", "transformer.ln_f.bias", "same"),
    ("lm_head", "lm_head.weight", "linear1"),
)
_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older checkpoints stored ([1, 1, n, n] and a scalar); not parameters.
_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")

# HF config key -> (our field, transformers' GPT2Config default when the key is absent).
_CONFIG_KEYS: C.ConfigKeys = {
    "vocab_size": ("vocab_size", 50257),
    "n_positions": ("max_length", 1024),
    "n_embd": ("d_model", 768),
    "n_layer": ("num_layers", 12),
    "n_head": ("num_heads", 12),
    "n_inner": ("d_ff", None),  # None: 4 * n_embd
    "activation_function": ("activation", "gelu_new"),
    "layer_norm_epsilon": ("layer_norm_epsilon", 1e-5),
    "resid_pdrop": ("dropout_rate", 0.1),
    "attn_pdrop": ("attention_dropout_rate", 0.1),
    "initializer_range": ("init_std", 0.02),
    "tie_word_embeddings": ("tie_word_embeddings", True),
}
# transformers' activation names -> ours (gelu_pytorch_tanh is the same tanh approximation).
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}
# Options of transformers' GPT-2 that our module does not implement: key -> required value.
_UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False}


def config_from_hf(hf: dict, **overrides: Any) -> DecoderLMConfig:
    """Our DecoderLMConfig from a transformers GPT-2 config dict (+ our own fields)."""
    C.check_model_type(hf, MODEL_TYPES)
    C.check_unsupported(hf, _UNSUPPORTED, "GPT-2")
    fields = C.fields_from_hf(hf, _CONFIG_KEYS)
    if fields["d_ff"] is None:
        fields["d_ff"] = 4 * fields["d_model"]
    if fields["activation"] not in _ACTIVATIONS:
        raise UserError(f"{C.CONFIG_FILE} has activation_function={fields['activation']!r}; "
                        f"supported: {sorted(_ACTIVATIONS)}")
    fields["activation"] = _ACTIVATIONS[fields["activation"]]
    if fields["d_model"] % fields["num_heads"]:
        raise UserError(f"{C.CONFIG_FILE}: n_embd={fields['d_model']} is not divisible by "
                        f"n_head={fields['num_heads']}")
    fields["d_kv"] = fields["d_model"] // fields["num_heads"]
    return DecoderLMConfig.from_dict({**fields, **overrides})


def config_to_hf(config: DecoderLMConfig) -> dict:
    """A transformers ``GPT2Config`` dict for ``GPT2LMHeadModel``; UserError if GPT-2 cannot
    express the config (rotary positions, RMSNorm, gated MLP, no biases, d_kv * heads != d)."""
    c = config
    expressible = {"position_embedding": "learned", "norm": "layernorm", "gated_mlp": False,
                   "use_bias": True}
    for field, required in expressible.items():
        if getattr(c, field) != required:
            raise UserError(f"GPT-2 checkpoints need {field}={required!r}, but the model has "
                            f"{field}={getattr(c, field)!r}; it cannot be exported as GPT-2")
    if c.d_kv * c.num_heads != c.d_model:
        raise UserError(f"GPT-2 checkpoints need d_kv * num_heads == d_model, but the model has "
                        f"{c.d_kv} * {c.num_heads} != {c.d_model}")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **C.fields_to_hf(c, _CONFIG_KEYS),
        "n_ctx": c.max_length,
        "embd_pdrop": c.dropout_rate,
        "torch_dtype": "float32",
    }


def _split_fused(tensors: dict[str, np.ndarray], config: DecoderLMConfig) -> dict:
    """HF tensors -> the table's names: ``transformer.`` prefix, Conv1D -> Linear layout,
    c_attn split into q/k/v (biases shaped [heads, d_kv]), mask buffers dropped."""
    c = config
    out = {}
    for name, value in tensors.items():
        if _BUFFER.search(name):
            continue
        if not name.startswith(("transformer.", "lm_head.")):  # GPT2Model checkpoints
            name = "transformer." + name
        if name.endswith(_CONV1D):
            value = value.T
        out[name] = value
    for i in range(c.num_layers):
        prefix = _H.format(i=i) + ".attn"
        weight, bias = out.pop(f"{prefix}.c_attn.weight", None), out.pop(f"{prefix}.c_attn.bias",
                                                                           None)
        if weight is None or bias is None:
            continue  # reported as missing q/k/v tensors by the table
        if weight.shape != (c.d_model, 3 * c.d_model) or bias.shape != (3 * c.d_model,):
            raise UserError(f"tensor {prefix}.c_attn has shape {weight.shape} / {bias.shape} but "
                            f"config.json implies ({c.d_model}, {3 * c.d_model}); the weights "
                            "and config.json do not belong together")
        for part, w, b in zip("qkv", np.split(weight, 3, axis=1), np.split(bias, 3), strict=True):
            out[f"{prefix}.{part}.weight"] = w.T
            out[f"{prefix}.{part}.bias"] = b.reshape(c.num_heads, c.d_kv)
    return out


def _fuse(tensors: dict[str, np.ndarray], config: DecoderLMConfig) -> dict:
    """The inverse of ``_split_fused``: the tensors ``GPT2LMHeadModel`` stores."""
    out = {}
    for name, value in tensors.items():
        out[name] = value.T if name.endswith(_CONV1D) else value
    for i in range(config.num_layers):
        prefix = _H.format(i=i) + ".attn"
        out[f"{prefix}.c_attn.weight"] = np.concatenate(
            [out.pop(f"{prefix}.{p}.weight").T for p in "qkv"], axis=1)
        out[f"{prefix}.c_attn.bias"] = np.concatenate(
            [out.pop(f"{prefix}.{p}.bias").reshape(-1) for p in "qkv"])
    return out  # a tied lm_head.weight is left out: transformers ties it to wte on loading


def params_from_hf(tensors: dict, config: DecoderLMConfig) -> dict:
    """A pure param dict for ``DecoderLM(config)`` from GPT-2 tensors."""
    return C.import_params(_split_fused(tensors, config), DecoderLM, config, GPT2_PARAMS,
                           layer_counts={"layers": config.num_layers},
                           ignored=("lm_head.weight",) if config.tie_word_embeddings else ())


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[DecoderLM,
                                                                        DecoderLMConfig]:
    config = config_from_hf(hf_config, **overrides)
    return C.load_model(path, DecoderLM, config, params_from_hf), config


def export(model: DecoderLM, config: DecoderLMConfig, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that ``GPT2LMHeadModel`` loads."""
    hf_config = config_to_hf(config)
    tensors = C.export_tensors(model, config, GPT2_PARAMS,
                               layer_counts={"layers": config.num_layers})
    return C.write_folder(out_dir, _fuse(tensors, config), hf_config)
