"""Hugging Face Transformer-XL (``TransfoXLLMHeadModel``, transformers' deprecated models) <->
our ``TransformerXL``.

Only the layout without adaptive input/softmax clusters: ``cutoffs=[]``, ``div_val=1``,
``d_embed == d_model``, tied output layer, ``attn_type=0``, ``same_length=False``,
``pre_lnorm=False``, ``untie_r=True`` (what ``models/transformer_xl.py`` computes); any other
setting is refused in one sentence. transformers fuses q/k/v into ``qkv_net``; it is split on
import and joined on export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.transformer_xl import TransformerXL, TransformerXLConfig

MODEL_TYPES = ("transfo-xl",)
MODEL_CLASS = TransformerXL
CONFIG_CLASS = TransformerXLConfig

_L, _O = "transformer.layers.{i}", "layers.{i}"
ROWS: tuple[C.Row, ...] = (
    ("word_embedding", "transformer.word_emb.emb_layers.0.weight", "same"),
    ("lm_bias", "crit.out_layers.0.bias", "same"),
    *((f"{_O}.attention.{ours}", f"{_L}.dec_attn.{hf}.weight", "linear1")
      for ours, hf in (("query", "q_net"), ("key", "k_net"), ("value", "v_net"),
                       ("position", "r_net"))),
    (f"{_O}.attention.out", f"{_L}.dec_attn.o_net.weight", "linear2"),
    (f"{_O}.attention.r_w_bias", f"{_L}.dec_attn.r_w_bias", "same"),
    (f"{_O}.attention.r_r_bias", f"{_L}.dec_attn.r_r_bias", "same"),
    (f"{_O}.attention.norm.scale", f"{_L}.dec_attn.layer_norm.weight", "same"),
    (f"{_O}.attention.norm.bias", f"{_L}.dec_attn.layer_norm.bias", "same"),
    (f"{_O}.ffn.wi", f"{_L}.pos_ff.CoreNet.0.weight", "linear1"),
    (f"{_O}.ffn.bi", f"{_L}.pos_ff.CoreNet.0.bias", "same"),
    (f"{_O}.ffn.wo", f"{_L}.pos_ff.CoreNet.3.weight", "linear1"),
    (f"{_O}.ffn.bo", f"{_L}.pos_ff.CoreNet.3.bias", "same"),
    (f"{_O}.ffn.norm.scale", f"{_L}.pos_ff.layer_norm.weight", "same"),
    (f"{_O}.ffn.norm.bias", f"{_L}.pos_ff.layer_norm.bias", "same"),
)
_IGNORED = ("crit.out_layers.0.weight", "transformer.pos_emb.inv_freq")  # tied / constant

_CONFIG_KEYS: C.ConfigKeys = {
    "vocab_size": ("vocab_size", 267735), "d_model": ("d_model", 1024),
    "n_head": ("num_heads", 16), "d_head": ("d_head", 64), "d_inner": ("d_ff", 4096),
    "n_layer": ("num_layers", 18), "mem_len": ("mem_len", 1600),
    "clamp_len": ("clamp_len", 1000), "dropout": ("dropout_rate", 0.1),
    "dropatt": ("attention_dropout_rate", 0.0), "layer_norm_epsilon": ("layer_norm_epsilon", 1e-5),
    "init_std": ("initializer_range", 0.02),
}
_REQUIRED = {"cutoffs": [20000, 40000, 200000], "div_val": 4, "attn_type": 0,
             "same_length": True, "pre_lnorm": False, "untie_r": True, "sample_softmax": -1}
_SUPPORTED = {"cutoffs": [], "div_val": 1, "attn_type": 0, "same_length": False,
              "pre_lnorm": False, "untie_r": True, "sample_softmax": -1}
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "dropout_rate",
                  "attention_dropout_rate", "mem_len")


def config_from_hf(hf: dict, **overrides: Any) -> TransformerXLConfig:
    C.check_model_type(hf, MODEL_TYPES)
    for key, value in _SUPPORTED.items():  # absent keys take transformers' defaults
        if hf.get(key, _REQUIRED[key]) != value:
            raise UserError(f"{C.CONFIG_FILE} has {key}={hf.get(key, _REQUIRED[key])!r}; "
                            f"t5x-like's Transformer-XL supports only {key}={value!r} (no "
                            "adaptive softmax clusters, segment-level memory as in the paper)")
    if hf.get("d_embed", 1024) != hf.get("d_model", 1024):
        raise UserError(f"{C.CONFIG_FILE} has d_embed != d_model; only equal widths are "
                        "supported")
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise UserError(f"an imported Transformer-XL's {bad} come from {C.CONFIG_FILE}; "
                        f"overrides may set only {list(RUNTIME_FIELDS)}")
    return TransformerXLConfig.from_dict({**C.fields_from_hf(hf, _CONFIG_KEYS), **overrides})


def config_to_hf(c: TransformerXLConfig) -> dict:
    return {"architectures": ["TransfoXLLMHeadModel"], "model_type": "transfo-xl",
            **C.fields_to_hf(c, _CONFIG_KEYS), "d_embed": c.d_model, **_SUPPORTED,
            "adaptive": True, "tie_projs": [], "eos_token_id": 0, "torch_dtype": "float32"}


def _split_qkv(tensors: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    out = dict(tensors)
    for i in range(num_layers):
        name = f"transformer.layers.{i}.dec_attn.qkv_net.weight"
        if name in out:
            for part, value in zip("qkv", np.split(out.pop(name), 3), strict=True):
                out[name.replace("qkv_net", f"{part}_net")] = value
    return out


def load_folder(path: Path, hf_config: dict, **overrides: Any
                ) -> tuple[TransformerXL, TransformerXLConfig]:
    config = config_from_hf(hf_config, **overrides)
    tensors = _split_qkv(C.read_weights(path), config.num_layers)
    params = C.import_params(tensors, TransformerXL, config, ROWS,
                             layer_counts={"layers": config.num_layers}, ignored=_IGNORED)
    return C.merge(C.abstract_model(TransformerXL, config)[0], params), config


def export(model: TransformerXL, config: TransformerXLConfig, out_dir: str | Path) -> Path:
    tensors = C.export_tensors(model, config, ROWS, layer_counts={"layers": config.num_layers})
    for i in range(config.num_layers):
        parts = [tensors.pop(f"transformer.layers.{i}.dec_attn.{p}_net.weight") for p in "qkv"]
        tensors[f"transformer.layers.{i}.dec_attn.qkv_net.weight"] = np.concatenate(parts)
    tensors["crit.out_layers.0.weight"] = tensors["transformer.word_emb.emb_layers.0.weight"]
    return C.write_folder(out_dir, tensors, config_to_hf(config))
