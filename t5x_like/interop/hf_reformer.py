"""Hugging Face Reformer (``ReformerModel`` / ``ReformerModelWithLMHead``) <-> our ``Reformer``.

Only what ``models/reformer.py`` computes: every layer "lsh" (no local-attention layers), an
int ``num_buckets``, plain (not axial) position embeddings; anything else is refused in one
sentence. LSH rotations are random per call in transformers unless ``hash_seed`` is set; ours
come from ``hash_seed`` when no key is given, but from JAX's generator, so equal outputs need
the same rotations passed in (``rotations=``), as tests/test_reformer.py does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.models.reformer import Reformer, ReformerConfig

MODEL_TYPES = ("reformer",)
MODEL_CLASS = Reformer
CONFIG_CLASS = ReformerConfig

_L, _O = "reformer.encoder.layers.{i}", "layers.{i}"
BASE: tuple[C.Row, ...] = (
    ("word_embeddings", "reformer.embeddings.word_embeddings.weight", "same"),
    ("position_embeddings", "reformer.embeddings.position_embeddings.embedding.weight", "same"),
    (f"{_O}.attention_norm.scale", f"{_L}.attention.layer_norm.weight", "same"),
    (f"{_O}.attention_norm.bias", f"{_L}.attention.layer_norm.bias", "same"),
    (f"{_O}.query_key", f"{_L}.attention.self_attention.query_key.weight", "linear1"),
    (f"{_O}.value", f"{_L}.attention.self_attention.value.weight", "linear1"),
    (f"{_O}.out", f"{_L}.attention.output.dense.weight", "linear2"),
    (f"{_O}.ffn_norm.scale", f"{_L}.feed_forward.layer_norm.weight", "same"),
    (f"{_O}.ffn_norm.bias", f"{_L}.feed_forward.layer_norm.bias", "same"),
    (f"{_O}.wi", f"{_L}.feed_forward.dense.dense.weight", "linear1"),
    (f"{_O}.bi", f"{_L}.feed_forward.dense.dense.bias", "same"),
    (f"{_O}.wo", f"{_L}.feed_forward.output.dense.weight", "linear1"),
    (f"{_O}.bo", f"{_L}.feed_forward.output.dense.bias", "same"),
    ("norm.scale", "reformer.encoder.layer_norm.weight", "same"),
    ("norm.bias", "reformer.encoder.layer_norm.bias", "same"),
)
HEAD: tuple[C.Row, ...] = (("lm_head", "lm_head.decoder.weight", "linear1"),
                           ("lm_bias", "lm_head.bias", "same"))
_IGNORED = ("lm_head.decoder.bias",)  # a tied copy of lm_head.bias

_CONFIG_KEYS: C.ConfigKeys = {
    "vocab_size": ("vocab_size", 320), "hidden_size": ("hidden_size", 256),
    "num_attention_heads": ("num_heads", 12), "attention_head_size": ("head_dim", 64),
    "feed_forward_size": ("feed_forward_size", 512), "hidden_act": ("hidden_act", "relu"),
    "max_position_embeddings": ("max_position_embeddings", 4096),
    "num_buckets": ("num_buckets", None), "num_hashes": ("num_hashes", 1),
    "lsh_attn_chunk_length": ("lsh_chunk_length", 64),
    "lsh_num_chunks_before": ("lsh_num_chunks_before", 1),
    "lsh_num_chunks_after": ("lsh_num_chunks_after", 0),
    "chunk_size_feed_forward": ("chunk_size_feed_forward", 0),
    "is_decoder": ("causal", False), "layer_norm_eps": ("layer_norm_eps", 1e-12),
    "hidden_dropout_prob": ("hidden_dropout_rate", 0.05),
    "lsh_attention_probs_dropout_prob": ("attention_dropout_rate", 0.0),
    "initializer_range": ("initializer_range", 0.02),
}
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "hidden_dropout_rate",
                  "attention_dropout_rate", "reversible", "hash_seed")


def _stacked(config: ReformerConfig) -> ReformerConfig:
    return dataclasses.replace(config, scan_layers=True)  # our layers are always stacked


def config_from_hf(hf: dict, **overrides: Any) -> ReformerConfig:
    C.check_model_type(hf, MODEL_TYPES)
    layers = hf.get("attn_layers", ["local", "lsh", "local", "lsh", "local", "lsh"])
    if set(layers) != {"lsh"}:
        raise UserError(f"{C.CONFIG_FILE} has attn_layers={layers}; t5x-like's Reformer has "
                        "only 'lsh' layers")
    if hf.get("axial_pos_embds", True):
        raise UserError(f"{C.CONFIG_FILE} sets axial_pos_embds=true; only plain position "
                        "embeddings (axial_pos_embds=false) are supported")
    if not isinstance(hf.get("num_buckets"), int):
        raise UserError(f"{C.CONFIG_FILE} has num_buckets={hf.get('num_buckets')!r}; only one "
                        "int (not factorised buckets) is supported")
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise UserError(f"an imported Reformer's {bad} come from {C.CONFIG_FILE}; overrides "
                        f"may set only {list(RUNTIME_FIELDS)}")
    fields = C.fields_from_hf(hf, _CONFIG_KEYS)
    fields["hash_seed"] = hf.get("hash_seed") or 0
    fields["num_layers"] = len(layers)
    return ReformerConfig.from_dict({**fields, **overrides})


def config_to_hf(c: ReformerConfig, lm_head: bool) -> dict:
    return {"architectures": ["ReformerModelWithLMHead" if lm_head else "ReformerModel"],
            "model_type": "reformer", **C.fields_to_hf(c, _CONFIG_KEYS),
            "attn_layers": ["lsh"] * c.num_layers, "axial_pos_embds": False,
            "hash_seed": c.hash_seed, "torch_dtype": "float32"}


def load_folder(path: Path, hf_config: dict, **overrides: Any) -> tuple[Reformer, ReformerConfig]:
    config = config_from_hf(hf_config, **overrides)
    tensors = {n if n.startswith(("reformer.", "lm_head.")) else "reformer." + n: v
               for n, v in C.read_weights(path).items()}  # a bare ReformerModel has no prefix
    head = "lm_head.bias" in tensors
    model_class = Reformer if head else _ReformerBody
    params = C.import_params(tensors, model_class, _stacked(config),
                             BASE + (HEAD if head else ()),
                             layer_counts={"layers": config.num_layers}, ignored=_IGNORED)
    return C.merge(C.abstract_model(model_class, config)[0], params), config


def export(model: Reformer, config: ReformerConfig, out_dir: str | Path) -> Path:
    head = hasattr(model, "lm_head")
    tensors = C.export_tensors(model, _stacked(config), BASE + (HEAD if head else ()),
                               layer_counts={"layers": config.num_layers})
    if not head:
        tensors = {n.removeprefix("reformer."): v for n, v in tensors.items()}
    return C.write_folder(out_dir, tensors, config_to_hf(config, head))


class _ReformerBody(Reformer):
    """``ReformerModel``: no LM head."""

    def __init__(self, config: ReformerConfig, *, rngs):
        super().__init__(config, rngs=rngs, lm_head=False)
