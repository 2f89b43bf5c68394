"""Mockingjay's acoustic Transformer encoder: log-mel frames in, frames out (Liu et al. 2020).

``downsample`` consecutive frames are stacked into one position (Mockingjay: 3), projected to
the hidden width, added to sinusoidal positions and layer-normalised, then run through the
BERT encoder stack (``models/encoder.py``'s ``Transformer``: post-LN layers, GELU). The
prediction head (dense, GELU, LayerNorm, dense) maps each position back to its stacked
frames. ``hidden_states`` are the representation used downstream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.models import layers as L
from t5x_like.models.config_checks import check_scan_unroll, check_sizes, strict_from_dict
from t5x_like.models.encoder import Dense, Transformer, _layer_norm
from t5x_like.models.encoder_config import EncoderConfig


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    num_mel_bins: int = 80  # must match the task's frames
    downsample: int = 3  # frames stacked per position
    hidden_size: int = 768
    num_layers: int = 3
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    def __post_init__(self):
        check_scan_unroll("audio encoder", self)
        check_sizes("audio encoder", self, ("num_mel_bins", "downsample", "hidden_size",
                                            "num_layers", "num_heads", "intermediate_size"),
                    ("hidden_dropout_rate", "attention_dropout_rate"))
        self.encoder_config()  # the stack's own checks (heads divide the width, choices)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AudioConfig:
        return strict_from_dict(cls, "audio encoder", d)

    @property
    def frame_dim(self) -> int:
        """Values per position: ``downsample`` frames of ``num_mel_bins``."""
        return self.downsample * self.num_mel_bins

    def encoder_config(self) -> EncoderConfig:
        """The BERT stack's config (no embeddings tables or text heads are built from it)."""
        return EncoderConfig(
            vocab_size=1, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, pooler=False,
            mlm_head=False, nsp_head=False, hidden_dropout_rate=self.hidden_dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            initializer_range=self.initializer_range, dtype=self.dtype,
            param_dtype=self.param_dtype, scan_layers=self.scan_layers,
            remat_policy=self.remat_policy, scan_unroll=self.scan_unroll)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """[length, dim] float32: sin on even dims, cos on odd ones (Vaswani et al.)."""
    position = np.arange(length)[:, None]
    rates = 1.0 / np.power(10000.0, (2 * (np.arange(dim) // 2)) / dim)
    angles = position * rates[None]
    return np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)


class AudioEncoder(nnx.Module):
    """[B, T, downsample * mel] stacked frames -> reconstructions of the same shape."""

    def __init__(self, c: AudioConfig, *, rngs: nnx.Rngs):
        e = c.encoder_config()
        h, f = c.hidden_size, c.frame_dim
        self.config = c
        self.input_projection = Dense((f,), (h,), ("mlp",), ("embed",), e, rngs=rngs)
        self.input_norm = _layer_norm(h, e, rngs)
        self.encoder = Transformer(e, rngs=rngs)
        self.head_dense = Dense((h,), (h,), ("embed",), ("mlp",), e, rngs=rngs)
        self.head_norm = _layer_norm(h, e, rngs)
        self.head_out = Dense((h,), (f,), ("embed",), ("mlp",), e, rngs=rngs)

    def __call__(self, frames: jax.Array, mask: jax.Array, *, enable_dropout: bool = False,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False
                 ) -> dict[str, jax.Array]:
        c = self.config
        k_in, k_layers = L.dropout_keys(
            bool(c.hidden_dropout_rate or c.attention_dropout_rate), enable_dropout, rngs, 2)
        x = self.input_projection(frames.astype(L.dtype_of(c.dtype)))
        x = x + jnp.asarray(sinusoidal_positions(frames.shape[1], c.hidden_size), x.dtype)
        x = L.dropout(self.input_norm(x), c.hidden_dropout_rate, k_in)
        attend = (mask > 0)[:, None, None, :]
        hidden, extras = self.encoder(x, attend, k_layers, output_hidden_states)
        y = self.head_norm(jax.nn.gelu(self.head_dense(hidden), approximate=False))
        out = {"prediction": self.head_out(y).astype(jnp.float32), "last_hidden_state": hidden}
        if output_hidden_states:
            out["hidden_states"] = extras["hidden_states"]
        return out
