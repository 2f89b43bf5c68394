"""``EncoderConfig``: one dataclass for BERT, RoBERTa, ALBERT, ELECTRA and SpanBERT.

Split from models/encoder.py (which re-exports it) to keep that module to the modules; what
the fields mean for the model (layer sharing, quantization, heads) is told in its docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from t5x_like.errors import UserError
from t5x_like.models import layers as L
from t5x_like.models.config_checks import check_choices, check_scan_unroll, strict_from_dict

MODEL_TYPES = ("bert", "roberta", "albert", "electra")  # names the HF layout; math is by fields
HIDDEN_ACTS = ("gelu", "gelu_new")  # exact erf GELU; tanh approximation (ALBERT's default)
LAYER_SHARING = ("none", "all", "attention", "ffn", "groups")
QUANTIZE = ("none", "fake", "int8")  # float; Q8BERT fake quantization; int8 weights (inference)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    model_type: str = "bert"  # which transformers layout import/export uses
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    embedding_size: int = 0  # 0: tables are hidden_size wide; else E-wide tables + dense E -> H
    max_position_embeddings: int = 512
    position_offset: int = 0  # RoBERTa: positions start at padding_idx + 1 = 2
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    layer_sharing: str = "none"
    num_layer_groups: int = 1  # distinct layers when layer_sharing == "groups"
    pooler: bool = True  # tanh(dense([CLS])): needed by the NSP/SOP head
    mlm_head: bool = True
    nsp_head: bool = True  # NSP or SOP: the same 2-way classifier on the pooled [CLS]
    discriminator_head: bool = False  # ELECTRA: one replaced-or-original logit per token
    sbo_head: bool = False  # SpanBERT span-boundary objective
    sbo_max_span_length: int = 10  # rows of the SBO relative position table
    generator_fraction: float = 0.25  # ElectraPair only: generator width / discriminator width
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; params stay param_dtype, logits float32
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)
    quantize: str = "none"  # see QUANTIZE and the module docstring
    layer_num_heads: tuple[int, ...] = ()  # per-layer heads after head removal; () = num_heads

    def __post_init__(self):
        check_scan_unroll("encoder", self)
        object.__setattr__(self, "layer_num_heads", tuple(self.layer_num_heads))
        check_choices("encoder", self, {
            "model_type": MODEL_TYPES,
            "hidden_act": HIDDEN_ACTS,
            "layer_sharing": LAYER_SHARING,
            "quantize": QUANTIZE,
            "dtype": tuple(L.DTYPES),
            "param_dtype": tuple(L.DTYPES),
            "remat_policy": tuple(L.REMAT_POLICIES),
        })
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "num_layer_groups", "sbo_max_span_length"):
            if getattr(self, name) <= 0:
                raise UserError(f"encoder config field {name} must be positive, got "
                                f"{getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"encoder hidden_size={self.hidden_size} is not divisible by "
                            f"num_heads={self.num_heads}")
        if self.layer_sharing == "groups" and self.num_layers % self.num_layer_groups:
            raise UserError(f"encoder num_layers={self.num_layers} is not divisible by "
                            f"num_layer_groups={self.num_layer_groups}")
        if self.nsp_head and not self.pooler:
            raise UserError("encoder nsp_head=True needs pooler=True (it classifies the pooled "
                            "[CLS] vector)")
        if self.embedding_size < 0 or self.position_offset < 0 or self.type_vocab_size < 0:
            raise UserError("encoder embedding_size, position_offset and type_vocab_size must "
                            "be >= 0")
        if not 0.0 < self.generator_fraction <= 1.0:
            raise UserError(f"encoder generator_fraction must be in (0, 1], got "
                            f"{self.generator_fraction}")
        for name in ("hidden_dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"encoder {name} must be in [0, 1), got {getattr(self, name)}")
        if self.quantize != "none" and self.layer_sharing in ("attention", "ffn"):
            raise UserError(f"encoder quantize={self.quantize!r} needs layer_sharing 'none', "
                            f"'all' or 'groups', got {self.layer_sharing!r}")
        if self.layer_num_heads:
            if (len(self.layer_num_heads) != self.num_layers or self.scan_layers
                    or self.layer_sharing != "none"
                    or not all(0 <= n <= self.num_heads for n in self.layer_num_heads)):
                raise UserError(f"encoder layer_num_heads={self.layer_num_heads} needs one count "
                                f"in [0, num_heads={self.num_heads}] per layer "
                                f"({self.num_layers}), scan_layers=False and layer_sharing="
                                "'none' (layers of different widths cannot be stacked)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        return strict_from_dict(cls, "encoder", d)

    @property
    def table_size(self) -> int:
        """Width of the embedding tables (and of the MLM decoder's input)."""
        return self.embedding_size or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def units(self) -> int:
        """Distinct layer parameter sets in ``encoder.layers``; each runs N // units times."""
        return {"all": 1, "groups": self.num_layer_groups}.get(self.layer_sharing,
                                                               self.num_layers)


def generator_config(config: EncoderConfig) -> EncoderConfig:
    """ELECTRA's generator: the discriminator's depth, ``generator_fraction`` of its hidden size,
    heads and FFN, the same embedding tables (projected when widths differ), an MLM head."""
    f = config.generator_fraction
    hidden = max(1, round(config.hidden_size * f))
    heads = max(1, round(config.num_heads * f))
    if hidden % heads:
        raise UserError(f"the ELECTRA generator's hidden size {hidden} (= {f} x "
                        f"{config.hidden_size}) is not divisible by its {heads} heads; change "
                        "generator_fraction")
    table = config.table_size
    return dataclasses.replace(
        config, hidden_size=hidden, num_heads=heads,
        intermediate_size=max(1, round(config.intermediate_size * f)),
        embedding_size=0 if table == hidden else table, pooler=False, mlm_head=True,
        nsp_head=False, discriminator_head=False, sbo_head=False)
