"""Hugging Face MobileBERT <-> our ``MobileBertModel`` (``models/mobilebert.py``).

Covers ``MobileBertModel`` (tensors without prefix), ``MobileBertForMaskedLM`` and
``MobileBertForPreTraining`` (``mobilebert.`` prefix, ``cls.`` heads). Export writes
``MobileBertForPreTraining`` when the model has both heads, ``MobileBertForMaskedLM`` with the
MLM head alone, else ``MobileBertModel``; the tied MLM decoder (``cls.predictions.decoder``) is
left out, as ``save_pretrained`` does, and accepted as an alias on import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.mobilebert import MobileBertConfig, MobileBertModel

MODEL_TYPES = ("mobilebert",)
MODEL_CLASS = MobileBertModel
CONFIG_CLASS = MobileBertConfig
PREFIX = "mobilebert."
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

# HF key -> (our field, transformers' MobileBertConfig default).
CONFIG_KEYS: C.ConfigKeys = {
    "vocab_size": ("vocab_size", 30522), "embedding_size": ("embedding_size", 128),
    "hidden_size": ("hidden_size", 512), "num_hidden_layers": ("num_layers", 24),
    "num_attention_heads": ("num_heads", 4), "intermediate_size": ("intermediate_size", 512),
    "intra_bottleneck_size": ("intra_bottleneck_size", 128),
    "use_bottleneck": ("use_bottleneck", True),
    "use_bottleneck_attention": ("use_bottleneck_attention", False),
    "key_query_shared_bottleneck": ("key_query_shared_bottleneck", True),
    "num_feedforward_networks": ("num_feedforward_networks", 4),
    "trigram_input": ("trigram_input", True), "normalization_type": ("normalization_type",
                                                                       "no_norm"),
    "hidden_act": ("hidden_act", "relu"), "max_position_embeddings": ("max_position_embeddings",
                                                                       512),
    "type_vocab_size": ("type_vocab_size", 2), "layer_norm_eps": ("layer_norm_eps", 1e-12),
    "classifier_activation": ("classifier_activation", True),
    "hidden_dropout_prob": ("hidden_dropout_rate", 0.0),
    "attention_probs_dropout_prob": ("attention_dropout_rate", 0.1),
    "initializer_range": ("initializer_range", 0.02),
}
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "hidden_dropout_rate",
                  "attention_dropout_rate")
ARCHITECTURES = {"MobileBertModel": (False, False), "MobileBertForMaskedLM": (True, False),
                 "MobileBertForPreTraining": (True, True)}  # (mlm, nsp)


def _dense(ours: str, hf: str, layout: str = "linear1") -> list[C.Row]:
    return [(f"{ours}.kernel", f"{hf}.weight", layout), (f"{ours}.bias", f"{hf}.bias", "same")]


def _norm(ours: str, hf: str) -> list[C.Row]:
    return [(f"{ours}.scale", f"{hf}.weight", "same"), (f"{ours}.bias", f"{hf}.bias", "same")]


def rows(config: MobileBertConfig, prefix: str) -> list[C.Row]:
    """(our key, HF name, layout) for every tensor; ``{i}`` = the layer."""
    e, layer = "embeddings", "encoder.layer.{i}"
    body = [
        (f"{e}.word_embeddings", f"{e}.word_embeddings.weight", "same"),
        (f"{e}.position_embeddings", f"{e}.position_embeddings.weight", "same"),
        (f"{e}.token_type_embeddings", f"{e}.token_type_embeddings.weight", "same"),
        *_dense(f"{e}.embedding_transformation", f"{e}.embedding_transformation"),
        *_norm(f"{e}.norm", f"{e}.LayerNorm"),
        *_dense("layers.{i}.bottleneck", f"{layer}.bottleneck.input.dense"),
        *_norm("layers.{i}.bottleneck_norm", f"{layer}.bottleneck.input.LayerNorm"),
        *_dense("layers.{i}.attention_bottleneck", f"{layer}.bottleneck.attention.dense"),
        *_norm("layers.{i}.attention_bottleneck_norm", f"{layer}.bottleneck.attention.LayerNorm"),
        *_norm("layers.{i}.attention_norm", f"{layer}.attention.output.LayerNorm"),
        ("layers.{i}.attention_out", f"{layer}.attention.output.dense.weight", "linear2"),
        ("layers.{i}.attention_out_bias", f"{layer}.attention.output.dense.bias", "same"),
        *_dense("layers.{i}.intermediate", f"{layer}.intermediate.dense"),
        *_dense("layers.{i}.output", f"{layer}.output.dense"),
        *_norm("layers.{i}.output_norm", f"{layer}.output.LayerNorm"),
        *_dense("layers.{i}.output_bottleneck", f"{layer}.output.bottleneck.dense"),
        *_norm("layers.{i}.output_bottleneck_norm", f"{layer}.output.bottleneck.LayerNorm"),
        *_dense("pooler", "pooler.dense"),
    ]
    for name in ("query", "key", "value"):
        body += [(f"layers.{{i}}.{name}", f"{layer}.attention.self.{name}.weight", "linear1"),
                 (f"layers.{{i}}.{name}_bias", f"{layer}.attention.self.{name}.bias", "same")]
    for j in range(config.num_feedforward_networks - 1):
        ffn = f"{layer}.ffn.{j}"
        body += [*_dense(f"layers.{{i}}.ffns.{j}.intermediate", f"{ffn}.intermediate.dense"),
                 *_dense(f"layers.{{i}}.ffns.{j}.output", f"{ffn}.output.dense"),
                 *_norm(f"layers.{{i}}.ffns.{j}.norm", f"{ffn}.output.LayerNorm")]
    heads = [*_dense("mlm.transform", "cls.predictions.transform.dense"),
             *_norm("mlm.norm", "cls.predictions.transform.LayerNorm"),
             ("mlm.extra", "cls.predictions.dense.weight", "same"),
             ("mlm.bias", "cls.predictions.bias", "same"),
             *_dense("nsp", "cls.seq_relationship")]
    return [(ours, prefix + hf, layout) for ours, hf, layout in body] + heads


def config_from_hf(hf: dict, *, mlm: bool, nsp: bool, **overrides: Any) -> MobileBertConfig:
    """Our config from transformers' MobileBertConfig dict, for a model with these heads."""
    C.check_model_type(hf, MODEL_TYPES)
    fields = C.fields_from_hf(hf, CONFIG_KEYS)
    unknown = set(overrides) - set(RUNTIME_FIELDS)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)} on import; only {RUNTIME_FIELDS}")
    return MobileBertConfig.from_dict({**fields, "pooler": True, "mlm_head": mlm,
                                       "nsp_head": nsp, **overrides})


def config_to_hf(config: MobileBertConfig) -> dict:
    """transformers' config.json for this model (its architecture class by the heads)."""
    if config.nsp_head and not config.mlm_head:
        raise UserError("transformers has no MobileBERT class with an NSP head and no MLM head")
    arch = {(True, True): "MobileBertForPreTraining", (True, False): "MobileBertForMaskedLM",
            (False, False): "MobileBertModel"}[(config.mlm_head, config.nsp_head)]
    out = {"model_type": "mobilebert", "architectures": [arch], "pad_token_id": 0,
           **C.fields_to_hf(config, CONFIG_KEYS)}
    if not config.pooler:
        raise UserError("transformers' MobileBertModel always has a pooler; export a model "
                        "with model.pooler=True")
    return out


def _heads(hf_config: dict, tensors: dict[str, np.ndarray]) -> tuple[bool, bool]:
    arch = (hf_config.get("architectures") or ["MobileBertModel"])[0]
    mlm, nsp = ARCHITECTURES.get(arch, (False, False))
    return (mlm or "cls.predictions.bias" in tensors,
            nsp or "cls.seq_relationship.weight" in tensors)


def params_from_hf(tensors: dict[str, np.ndarray], config: MobileBertConfig) -> dict:
    """A pure param dict for ``MobileBertModel(config)`` from HF tensors (prefix or not)."""
    prefix = PREFIX if any(k.startswith(PREFIX) for k in tensors) else ""
    tensors = C.fill_from_alias(dict(tensors), "cls.predictions.bias", _TIED[1:])
    return C.import_params(tensors, MobileBertModel, config, rows(config, prefix),
                           layer_counts={"layers": config.num_layers}, ignored=_TIED)


def load_folder(path: Path, hf_config: dict, **overrides: Any
                ) -> tuple[MobileBertModel, MobileBertConfig]:
    tensors = C.read_weights(path)
    mlm, nsp = _heads(hf_config, tensors)
    config = config_from_hf(hf_config, mlm=mlm, nsp=nsp, **overrides)
    params = params_from_hf(tensors, config)
    return C.merge(C.abstract_model(MobileBertModel, config)[0], params), config


def export(model: MobileBertModel, config: MobileBertConfig, out_dir: str | Path) -> Path:
    """config.json + model.safetensors that transformers' MobileBERT classes load."""
    hf_config = config_to_hf(config)
    prefix = PREFIX if config.mlm_head else ""
    tensors = C.export_tensors(model, config, rows(config, prefix),
                               layer_counts={"layers": config.num_layers})
    return C.write_folder(out_dir, tensors, hf_config)
