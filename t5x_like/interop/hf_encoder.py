"""Hugging Face BERT, RoBERTa, ALBERT and ELECTRA <-> our ``EncoderModel``.

Covers ``BertModel`` / ``BertForMaskedLM`` / ``BertForPreTraining``, ``RobertaModel`` /
``RobertaForMaskedLM``, ``AlbertModel`` / ``AlbertForMaskedLM`` / ``AlbertForPreTraining`` and
``ElectraModel`` / ``ElectraForPreTraining`` (discriminator) / ``ElectraForMaskedLM``
(generator). Encoder tensors may carry the ``bert.``-style prefix or not (a bare ``BertModel``
save has none). Which heads the model gets: those the config's ``architectures`` class has,
plus any whose tensors are present (``bert-base-uncased`` says ``BertForMaskedLM`` but ships
its NSP head). Export writes what ``save_pretrained`` writes: tied copies (the MLM decoder's
weight and bias) are left out; import accepts them as aliases. SpanBERT's span-boundary head has
no transformers counterpart and is not exported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from t5x_like import storage
from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.encoder import ElectraPair, EncoderModel
from t5x_like.models.encoder_config import HIDDEN_ACTS, EncoderConfig, generator_config

MODEL_TYPES = ("bert", "roberta", "albert", "electra")
MODEL_CLASS = EncoderModel
CONFIG_CLASS = EncoderConfig

_PREFIX = {t: f"{t}." for t in MODEL_TYPES}
HEADS = ("pooler", "mlm", "nsp", "discriminator")

# transformers class -> the heads it always has (more may come from the tensors).
ARCHITECTURE_HEADS: dict[str, dict[str, frozenset]] = {
    "bert": {"BertModel": frozenset(), "BertForMaskedLM": frozenset({"mlm"}),
             "BertForNextSentencePrediction": frozenset({"pooler", "nsp"}),
             "BertForPreTraining": frozenset({"pooler", "mlm", "nsp"})},
    "roberta": {"RobertaModel": frozenset(), "RobertaForMaskedLM": frozenset({"mlm"})},
    "albert": {"AlbertModel": frozenset(), "AlbertForMaskedLM": frozenset({"mlm"}),
               "AlbertForPreTraining": frozenset({"pooler", "mlm", "nsp"})},
    "electra": {"ElectraModel": frozenset(), "ElectraForMaskedLM": frozenset({"mlm"}),
                "ElectraForPreTraining": frozenset({"discriminator"})},
}

# --------------------------------------------------------------------------- tables


def _dense(ours: str, hf: str, layout: str = "linear1") -> list[C.Row]:
    return [(f"{ours}.kernel", f"{hf}.weight", layout), (f"{ours}.bias", f"{hf}.bias", "same")]


def _norm(ours: str, hf: str) -> list[C.Row]:
    return [(f"{ours}.scale", f"{hf}.weight", "same"), (f"{ours}.bias", f"{hf}.bias", "same")]


def _layer_rows(model_type: str) -> list[C.Row]:
    """One layer (``{i}`` = our unit = ALBERT's layer group)."""
    ours = "encoder.layers.{i}"
    if model_type == "albert":
        hf = "encoder.albert_layer_groups.{i}.albert_layers.0"
        attn, out = f"{hf}.attention", f"{hf}.attention.dense"
        attn_norm = f"{hf}.attention.LayerNorm"
        wi, wo, ffn_norm = f"{hf}.ffn", f"{hf}.ffn_output", f"{hf}.full_layer_layer_norm"
    else:
        hf = "encoder.layer.{i}"
        attn, out, attn_norm = (f"{hf}.attention.self", f"{hf}.attention.output.dense",
                                f"{hf}.attention.output.LayerNorm")
        wi, wo, ffn_norm = (f"{hf}.intermediate.dense", f"{hf}.output.dense",
                            f"{hf}.output.LayerNorm")
    return [
        *(row for name in ("query", "key", "value")
          for row in _dense(f"{ours}.attention.{name}", f"{attn}.{name}")),
        *_dense(f"{ours}.attention.out", out, "linear2"),
        *_norm(f"{ours}.attention.norm", attn_norm),
        *_dense(f"{ours}.ffn.wi", wi),
        *_dense(f"{ours}.ffn.wo", wo),
        *_norm(f"{ours}.ffn.norm", ffn_norm),
    ]


def _base_rows(model_type: str) -> list[C.Row]:
    """The encoder (what ``BertModel`` holds), without the ``bert.``-style prefix."""
    rows = [(f"embeddings.{t}", f"embeddings.{t}.weight", "same")
            for t in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    rows += _norm("embeddings.norm", "embeddings.LayerNorm")
    if model_type == "albert":
        rows += _dense("encoder.embedding_projection", "encoder.embedding_hidden_mapping_in")
        rows += _dense("pooler", "pooler")
    else:
        rows += _dense("encoder.embedding_projection", "embeddings_project")
        rows += _dense("pooler", "pooler.dense")
    return rows + _layer_rows(model_type)


# Head rows: (our module, HF names); the MLM decoder weight is tied to the word embeddings.
_MLM = {  # type -> (transform dense, transform LayerNorm, logits bias, tied aliases)
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             "cls.predictions.bias", ("cls.predictions.decoder.weight",
                                      "cls.predictions.decoder.bias")),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias",
                ("lm_head.decoder.weight", "lm_head.decoder.bias")),
    "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias",
               ("predictions.decoder.weight", "predictions.decoder.bias")),
    "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm",
                "generator_lm_head.bias", ("generator_lm_head.weight",)),
}
_NSP = {"bert": "cls.seq_relationship", "albert": "sop_classifier.classifier"}
_DISCRIMINATOR = ("discriminator_predictions.dense", "discriminator_predictions.dense_prediction")


def _head_rows(model_type: str) -> list[C.Row]:
    dense, norm, bias, _ = _MLM[model_type]
    rows = [*_dense("mlm.transform", dense), *_norm("mlm.norm", norm), ("mlm.bias", bias, "same")]
    if model_type in _NSP:
        rows += _dense("nsp", _NSP[model_type])
    if model_type == "electra":
        rows += _dense("discriminator.dense", _DISCRIMINATOR[0])
        rows += _dense("discriminator.prediction", _DISCRIMINATOR[1])
    return rows


def _head_marker(model_type: str) -> dict[str, str]:
    """An HF tensor whose presence means the checkpoint has that head."""
    pooler = "pooler.weight" if model_type == "albert" else "pooler.dense.weight"
    marks = {"pooler": pooler, "mlm": _MLM[model_type][2]}
    if model_type in _NSP:
        marks["nsp"] = f"{_NSP[model_type]}.weight"
    if model_type == "electra":
        marks["discriminator"] = f"{_DISCRIMINATOR[0]}.weight"
    return marks


# Our per-head q/k/v bias is [heads, head_dim] and the discriminator's output bias a scalar;
# transformers stores them flat.
_QKV_BIAS = re.compile(r"\.(query|key|value)\.bias$")


def _ours_shape(name: str, config: EncoderConfig) -> tuple[int, ...] | None:
    if _QKV_BIAS.search(name):
        return config.num_heads, config.hidden_size // config.num_heads
    if name.endswith(f"{_DISCRIMINATOR[1]}.bias"):
        return ()
    return None


# --------------------------------------------------------------------------- configs

# HF key -> our field; HF's defaults per model type (as transformers' config classes).
_CONFIG_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size", "hidden_act": "hidden_act",
    "hidden_dropout_prob": "hidden_dropout_rate",
    "attention_probs_dropout_prob": "attention_dropout_rate",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "initializer_range": "initializer_range",
}
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                      initializer_range=0.02, pad_token_id=0)
_HF_DEFAULTS = {
    "bert": _BERT_DEFAULTS,
    "roberta": {**_BERT_DEFAULTS, "pad_token_id": 1},
    "albert": {**_BERT_DEFAULTS, "vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096,
               "num_attention_heads": 64, "intermediate_size": 16384, "hidden_act": "gelu_new",
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
               "num_hidden_groups": 1, "inner_group_num": 1},
    "electra": {**_BERT_DEFAULTS, "embedding_size": 128, "hidden_size": 256,
                "num_attention_heads": 4, "intermediate_size": 1024},
}
_EXTRA_HF = {  # special-token ids transformers' configs carry
    "bert": dict(pad_token_id=0),
    "roberta": dict(bos_token_id=0, eos_token_id=2),
    "albert": dict(pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "electra": dict(pad_token_id=0),
}
# Our fields an import may set (how to run the model, not what it is).
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "hidden_dropout_rate",
                  "attention_dropout_rate", "generator_fraction")


def _get(hf: dict, key: str, model_type: str, kind: type) -> Any:
    value = hf.get(key, _HF_DEFAULTS[model_type].get(key))
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(f"{C.CONFIG_FILE} has {key}={value!r}; expected a {kind.__name__}")
    return value


def config_from_hf(hf: dict, heads: set[str], **overrides: Any) -> EncoderConfig:
    """Our EncoderConfig from a transformers config dict, for a model with ``heads``."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{C.CONFIG_FILE} has model_type={model_type!r}, not one of "
                        f"{MODEL_TYPES}")
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise UserError(f"an imported encoder's {bad} come from {C.CONFIG_FILE}; overrides may "
                        f"set only {list(RUNTIME_FIELDS)}")
    kinds = {f: type(getattr(EncoderConfig(), f)) for f in _CONFIG_KEYS.values()}
    fields = {ours: _get(hf, key, model_type, kinds[ours]) for key, ours in _CONFIG_KEYS.items()}
    if fields["hidden_act"] not in HIDDEN_ACTS:
        raise UserError(f"{C.CONFIG_FILE} has hidden_act={fields['hidden_act']!r}; supported: "
                        f"{HIDDEN_ACTS}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{C.CONFIG_FILE} has position_embedding_type="
                        f"{hf['position_embedding_type']!r}; only 'absolute' is supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise UserError(f"{C.CONFIG_FILE} describes a decoder (is_decoder/add_cross_attention); "
                        "only bidirectional encoders are supported")
    if model_type == "roberta":
        fields["position_offset"] = _get(hf, "pad_token_id", model_type, int) + 1
    if model_type in ("albert", "electra"):
        embedding_size = _get(hf, "embedding_size", model_type, int)
        # ALBERT always projects E -> H; ELECTRA only when the widths differ.
        if model_type == "albert" or embedding_size != fields["hidden_size"]:
            fields["embedding_size"] = embedding_size
    if model_type == "albert":
        if _get(hf, "inner_group_num", model_type, int) != 1:
            raise UserError(f"{C.CONFIG_FILE} has inner_group_num={hf['inner_group_num']}; only "
                            "1 (one layer per group, as every released ALBERT) is supported")
        groups, layers = _get(hf, "num_hidden_groups", model_type, int), fields["num_layers"]
        if groups <= 0 or layers % groups:
            raise UserError(f"{C.CONFIG_FILE} has num_hidden_groups={groups}, which must divide "
                            f"num_hidden_layers={layers}")
        fields["layer_sharing"] = ("all" if groups == 1 else "none" if groups == layers
                                   else "groups")
        fields["num_layer_groups"] = groups if fields["layer_sharing"] == "groups" else 1
    if model_type == "electra" and "mlm" in heads and fields["hidden_act"] != "gelu":
        raise UserError(f"{C.CONFIG_FILE} has hidden_act={fields['hidden_act']!r}, but "
                        "transformers' ELECTRA generator head always uses 'gelu'")
    head_fields = dict(pooler="pooler" in heads, mlm_head="mlm" in heads, nsp_head="nsp" in heads,
                       discriminator_head="discriminator" in heads, sbo_head=False)
    return EncoderConfig.from_dict({"model_type": model_type, **fields, **head_fields,
                                    **overrides})


def _architecture(config: EncoderConfig) -> str:
    heads = _heads_of(config)
    for name, required in ARCHITECTURE_HEADS[config.model_type].items():
        if heads - {"pooler"} == required - {"pooler"}:
            return name
    raise UserError(f"transformers has no {config.model_type} class with the heads "
                    f"{sorted(heads)}; export with a subset it has: "
                    f"{ {k: sorted(v) for k, v in ARCHITECTURE_HEADS[config.model_type].items()} }")


def _heads_of(config: EncoderConfig) -> set[str]:
    flags = dict(pooler=config.pooler, mlm=config.mlm_head, nsp=config.nsp_head,
                 discriminator=config.discriminator_head)
    return {h for h, on in flags.items() if on}


def config_to_hf(config: EncoderConfig) -> dict:
    """A transformers config dict for the class that holds exactly this model's heads."""
    c, t = config, config.model_type
    if t == "albert":
        if c.layer_sharing not in ("none", "all", "groups") or not c.embedding_size:
            raise UserError("ALBERT export needs embedding_size > 0 and layer_sharing 'none', "
                            f"'all' or 'groups' (got {c.embedding_size}, {c.layer_sharing!r})")
    elif c.layer_sharing != "none":
        raise UserError(f"transformers' {t} shares no layers; export with layer_sharing='none' "
                        "or model_type='albert'")
    if t in ("bert", "roberta") and c.embedding_size:
        raise UserError(f"transformers' {t} has no factorised embeddings; export with "
                        "embedding_size=0 or model_type 'albert'/'electra'")
    if t != "roberta" and c.position_offset:
        raise UserError(f"position_offset={c.position_offset} exists only in RoBERTa")
    if t == "electra" and c.pooler:
        raise UserError("transformers' ElectraModel has no pooler; export with pooler=False")
    hf = {key: getattr(c, ours) for key, ours in _CONFIG_KEYS.items()}
    extra = dict(_EXTRA_HF[t])
    if t == "roberta":
        if c.position_offset < 1:
            raise UserError("RoBERTa export needs position_offset >= 1 (= pad_token_id + 1)")
        extra["pad_token_id"] = c.position_offset - 1
    if t in ("albert", "electra"):
        extra["embedding_size"] = c.table_size
    if t == "albert":
        extra.update(num_hidden_groups=c.units, inner_group_num=1)
    return {"architectures": [_architecture(c)], "model_type": t, **hf, **extra,
            "position_embedding_type": "absolute", "torch_dtype": "float32"}


# --------------------------------------------------------------------------- import / export


def _rows(config: EncoderConfig, prefix: str) -> list[C.Row]:
    base = [(ours, prefix + hf, layout) for ours, hf, layout in _base_rows(config.model_type)]
    return base + _head_rows(config.model_type)


def _normalise(tensors: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """Drops the ``bert.``-style prefix and fills canonical names from tied aliases."""
    prefix = _PREFIX[model_type]
    out = {name.removeprefix(prefix): value for name, value in tensors.items()}
    _, _, bias, aliases = _MLM[model_type]
    out = C.fill_from_alias(out, bias, aliases[1:2])
    return C.fill_from_alias(out, "embeddings.word_embeddings.weight", aliases[:1])


def heads_from_hf(hf_config: dict, tensors: dict[str, np.ndarray]) -> set[str]:
    """The architecture class's heads plus any whose tensors the checkpoint holds."""
    model_type = hf_config.get("model_type")
    classes = ARCHITECTURE_HEADS.get(model_type, {})
    architectures = hf_config.get("architectures") or []
    required = set(classes.get(architectures[0], frozenset())) if architectures else set()
    present = {h for h, name in _head_marker(model_type).items() if name in tensors}
    return required | present


def params_from_hf(tensors: dict[str, np.ndarray], config: EncoderConfig) -> dict:
    """A pure param dict for ``EncoderModel(config)`` from (normalised) HF tensors."""
    tensors = dict(tensors)
    for name in tensors:
        shape = _ours_shape(name, config)
        if shape is not None:
            if tensors[name].size != int(np.prod(shape)):
                raise UserError(f"tensor {name} has shape {tensors[name].shape} but config.json "
                                f"implies {shape}; the weights and config.json do not belong "
                                "together")
            tensors[name] = tensors[name].reshape(shape)
    return C.import_params(tensors, EncoderModel, config, _rows(config, ""),
                           layer_counts={"encoder": config.units},
                           ignored=_MLM[config.model_type][3])


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[EncoderModel,
                                                                      EncoderConfig]:
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{path / C.CONFIG_FILE} has model_type={model_type!r}, not one of "
                        f"{MODEL_TYPES}")
    tensors = _normalise(C.read_weights(path), model_type)
    config = config_from_hf(hf_config, heads_from_hf(hf_config, tensors), **overrides)
    params = params_from_hf(tensors, config)
    return C.merge(C.abstract_model(EncoderModel, config)[0], params), config


def export(model: EncoderModel | ElectraPair, config: EncoderConfig, out_dir: str | Path) -> Path:
    """config.json + model.safetensors for the transformers class with this model's heads.

    An ``ElectraPair`` becomes two folders, ``discriminator/`` (``ElectraForPreTraining``) and
    ``generator/`` (``ElectraForMaskedLM``), each holding the shared embeddings.
    """
    if isinstance(model, ElectraPair):
        out = storage.as_path(out_dir)
        export(model.discriminator, config, out / "discriminator")
        export(model.generator, generator_config(config), out / "generator")
        return out
    hf_config = config_to_hf(config)
    prefix = _PREFIX[config.model_type] if _heads_of(config) - {"pooler"} else ""
    tensors = C.export_tensors(model, config, _rows(config, prefix),
                               layer_counts={"encoder": config.units})
    for name, value in tensors.items():
        if _ours_shape(name, config) is not None:
            tensors[name] = value.reshape(-1)
    return C.write_folder(out_dir, tensors, hf_config)
