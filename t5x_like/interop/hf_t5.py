"""Hugging Face T5 / mT5 (``T5ForConditionalGeneration``) <-> our T5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.t5 import FEED_FORWARD_PROJ, T5, T5Config

MODEL_TYPES = ("t5", "mt5")  # mT5 is T5 v1.1 with a larger vocabulary
MODEL_CLASS = T5
CONFIG_CLASS = T5Config

_ATTN = (("query", "q", "linear1"), ("key", "k", "linear1"), ("value", "v", "linear1"),
         ("out", "o", "linear2"))
_MLP = (("wi", "wi"), ("wi_0", "wi_0"), ("wi_1", "wi_1"), ("wo", "wo"))


def _attention_rows(ours: str, hf: str) -> list[C.Row]:
    return [(f"{ours}.{a}", f"{hf}.{b}.weight", layout) for a, b, layout in _ATTN]


def _mlp_rows(ours: str, hf: str) -> list[C.Row]:
    return [(f"{ours}.{a}", f"{hf}.DenseReluDense.{b}.weight", "linear1") for a, b in _MLP]


_ENC, _DEC = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
T5_PARAMS: tuple[C.Row, ...] = (
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
_CONFIG_KEYS: C.ConfigKeys = {
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


def config_from_hf(hf: dict, **overrides: Any) -> T5Config:
    """Our T5Config from a transformers T5 config dict (+ our own fields, e.g. scan_layers)."""
    C.check_model_type(hf, MODEL_TYPES)
    fields = C.fields_from_hf(hf, _CONFIG_KEYS)
    if fields["num_decoder_layers"] is None:
        fields["num_decoder_layers"] = fields["num_encoder_layers"]
    if fields["feed_forward_proj"] not in FEED_FORWARD_PROJ:
        raise UserError(f"{C.CONFIG_FILE} has feed_forward_proj={fields['feed_forward_proj']!r}; "
                        f"supported: {FEED_FORWARD_PROJ}")
    return T5Config.from_dict({**fields, **overrides})


def config_to_hf(config: T5Config) -> dict:
    """A transformers ``T5Config`` dict for ``T5ForConditionalGeneration``."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        **C.fields_to_hf(config, _CONFIG_KEYS),
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    }


def _layer_counts(config: T5Config) -> dict[str, int]:
    return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


def params_from_hf(tensors: dict, config: T5Config) -> dict:
    """A pure param dict for ``T5(config)`` (as ``nnx.to_pure_dict`` gives) from HF tensors."""
    # Some exports keep a tied copy instead of shared.weight.
    tensors = C.fill_from_alias(tensors, "shared.weight", _TIED_ALIASES[:2])
    return C.import_params(tensors, T5, config, T5_PARAMS, layer_counts=_layer_counts(config),
                           ignored=_TIED_ALIASES)


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[T5, T5Config]:
    config = config_from_hf(hf_config, **overrides)
    return C.load_model(path, T5, config, params_from_hf), config


def export(model: T5, config: T5Config, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that ``T5ForConditionalGeneration`` loads."""
    tensors = C.export_tensors(model, config, T5_PARAMS, layer_counts=_layer_counts(config))
    return C.write_folder(out_dir, tensors, config_to_hf(config))
