"""Hugging Face Longformer <-> our ``LongformerModel``; RoBERTa -> Longformer as the paper starts.

Covers ``LongformerModel`` (with its pooler) and ``LongformerForMaskedLM``. The tensors are
RoBERTa's (``hf_encoder``'s tables, ``longformer.`` prefix) plus each layer's
``query_global`` / ``key_global`` / ``value_global``. ``attention_window`` may be a list in
transformers; ours is one width for every layer, so a list must hold one value.

``longformer_from_roberta`` writes the Longformer folder the paper pretrains from: a RoBERTa
checkpoint whose position table is copied until it has ``max_positions`` rows and whose global
projections start as copies of the local ones; ``t5x-like import-hf`` then makes it a run that
``configs/longformer.py`` trains further.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.interop import hf_encoder as E
from t5x_like.models.longformer import LongformerConfig, LongformerModel, extend_positions

MODEL_TYPES = ("longformer",)
MODEL_CLASS = LongformerModel
CONFIG_CLASS = LongformerConfig
PREFIX = "longformer."
GLOBAL = ("query_global", "key_global", "value_global")

_CONFIG_KEYS = {**E._CONFIG_KEYS}
_HF_DEFAULTS = {**E._BERT_DEFAULTS, "pad_token_id": 1, "attention_window": 512}
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "hidden_dropout_rate",
                  "attention_dropout_rate", "max_global_tokens", "attention_dilation")
_QKV_BIAS = re.compile(r"\.(query|key|value)(_global)?\.bias$")


def _rows(config: LongformerConfig, prefix: str) -> list[C.Row]:
    rows = [(ours, prefix + hf, layout) for ours, hf, layout in E._base_rows("roberta")]
    for name in GLOBAL:
        rows += [(o, prefix + h, lay) for o, h, lay in E._dense(
            f"encoder.layers.{{i}}.attention.{name}",
            f"encoder.layer.{{i}}.attention.self.{name}")]
    return rows + E._head_rows("roberta")


def _reshape_biases(tensors: dict[str, np.ndarray], config: LongformerConfig,
                    to_ours: bool) -> dict[str, np.ndarray]:
    out = dict(tensors)
    for name, value in tensors.items():
        if _QKV_BIAS.search(name):
            if to_ours and value.size != config.hidden_size:
                raise UserError(f"tensor {name} has shape {value.shape} but config.json implies "
                                f"({config.hidden_size},); the weights and config.json do not "
                                "belong together")
            out[name] = value.reshape(config.num_heads, config.head_dim) if to_ours else \
                value.reshape(-1)
    return out


def config_from_hf(hf: dict, heads: set[str], **overrides: Any) -> LongformerConfig:
    C.check_model_type(hf, MODEL_TYPES)
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise UserError(f"an imported Longformer's {bad} come from {C.CONFIG_FILE}; overrides "
                        f"may set only {list(RUNTIME_FIELDS)}")
    fields = {ours: hf.get(key, _HF_DEFAULTS[key]) for key, ours in _CONFIG_KEYS.items()}
    window = hf.get("attention_window", 512)
    if isinstance(window, list):
        if len(set(window)) != 1:
            raise UserError(f"{C.CONFIG_FILE} has attention_window={window}; t5x-like's "
                            "Longformer uses one window width for every layer")
        window = window[0]
    fields["attention_window"] = window
    fields["position_offset"] = hf.get("pad_token_id", 1) + 1
    for key in ("hidden_dropout_rate", "attention_dropout_rate", "layer_norm_eps",
                "initializer_range"):
        fields[key] = float(fields[key])
    return LongformerConfig.from_dict({**fields, "pooler": "pooler" in heads,
                                       "mlm_head": "mlm" in heads, **overrides})


def config_to_hf(c: LongformerConfig) -> dict:
    if c.attention_dilation != 1:
        raise UserError(f"transformers' Longformer has no dilation; export with "
                        f"attention_dilation=1 (got {c.attention_dilation})")
    if c.position_offset < 1:
        raise UserError("Longformer export needs position_offset >= 1 (= pad_token_id + 1)")
    architecture = "LongformerForMaskedLM" if c.mlm_head else "LongformerModel"
    if c.mlm_head and c.pooler:
        raise UserError("transformers' LongformerForMaskedLM has no pooler; export with "
                        "pooler=False")
    hf = {key: getattr(c, ours) for key, ours in _CONFIG_KEYS.items()}
    return {"architectures": [architecture], "model_type": "longformer", **hf,
            "attention_window": c.attention_window, "pad_token_id": c.position_offset - 1,
            "bos_token_id": 0, "eos_token_id": 2, "sep_token_id": 2, "torch_dtype": "float32"}


def _normalise(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    _, _, bias, aliases = E._MLM["roberta"]
    out = {name if name.startswith(PREFIX) or name.startswith("lm_head.") else PREFIX + name:
           value for name, value in tensors.items()}
    out = C.fill_from_alias(out, bias, aliases[1:2])
    return C.fill_from_alias(out, PREFIX + "embeddings.word_embeddings.weight", aliases[:1])


def load_folder(path: Path, hf_config: dict, **overrides: Any
                ) -> tuple[LongformerModel, LongformerConfig]:
    tensors = _normalise(C.read_weights(path))
    heads = {"pooler"} if PREFIX + "pooler.dense.weight" in tensors else set()
    if "lm_head.bias" in tensors:
        heads.add("mlm")
    config = config_from_hf(hf_config, heads, **overrides)
    tensors = _reshape_biases(tensors, config, to_ours=True)
    params = C.import_params(tensors, LongformerModel, config, _rows(config, PREFIX),
                             layer_counts={"encoder": config.num_layers},
                             ignored=E._MLM["roberta"][3])
    return C.merge(C.abstract_model(LongformerModel, config)[0], params), config


def export(model: LongformerModel, config: LongformerConfig, out_dir: str | Path) -> Path:
    """config.json + model.safetensors for ``LongformerModel`` / ``LongformerForMaskedLM``."""
    hf_config = config_to_hf(config)
    tensors = C.export_tensors(model, config, _rows(config, PREFIX),
                               layer_counts={"encoder": config.num_layers})
    return C.write_folder(out_dir, _reshape_biases(tensors, config, to_ours=False), hf_config)


def longformer_from_roberta(src: str | Path, out: str | Path, *, max_positions: int = 4096,
                            attention_window: int = 512) -> Path:
    """A Longformer folder from a RoBERTa folder (see the module docstring): ``max_positions``
    tokens (+ RoBERTa's 2 reserved rows), the position table copied, global q/k/v = local."""
    src = C.require_folder(src)
    hf = C.read_json(src / C.CONFIG_FILE)
    if hf.get("model_type") != "roberta":
        raise UserError(f"{src / C.CONFIG_FILE} has model_type={hf.get('model_type')!r}; the "
                        "Longformer starts from a 'roberta' checkpoint")
    tensors = {name.removeprefix("roberta."): v for name, v in C.read_weights(src).items()}
    offset = hf.get("pad_token_id", 1) + 1
    out_tensors = {}
    for name, value in tensors.items():
        new = name if name.startswith("lm_head.") else PREFIX + name
        if name == "embeddings.position_embeddings.weight":
            value = extend_positions(value, offset, max_positions + offset)
        out_tensors[new] = value
        for part in ("query", "key", "value"):
            if f".attention.self.{part}." in name:
                out_tensors[new.replace(f".{part}.", f".{part}_global.")] = value
    out_tensors.pop(PREFIX + "embeddings.position_ids", None)
    config = {**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")},
              "model_type": "longformer", "attention_window": attention_window,
              "max_position_embeddings": max_positions + offset,
              "architectures": ["LongformerForMaskedLM" if "lm_head.bias" in tensors
                                else "LongformerModel"]}
    return C.write_folder(out, out_tensors, config)
