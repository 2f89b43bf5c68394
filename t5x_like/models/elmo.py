"""ELMo's biLM (Peters et al. 2018): a token encoder and two stacks of projected LSTMs.

Token representation x_t: an embedding row, or (``token_encoder="char_cnn"``) the paper's
character CNN over the token's characters: char embeddings, one convolution per width
(max-pooled over the characters, ReLU), highway layers, a linear projection to ``proj_dim``.
The forward stack reads left to right and the backward stack right to left; each layer is an
LSTM with ``lstm_dim`` cells whose output is projected to ``proj_dim`` (LSTMP, as
``torch.nn.LSTM(proj_size=...)``), with bilm-tf's cell and projection clipping and a residual
connection around every layer but the first. Gate order is i, f, g, o (torch's).

One token encoder and one softmax (``softmax_kernel``, ``softmax_bias``) serve both
directions; the family computes the logits. ``hidden_states`` gives the layers the features
mix: [num_layers + 1, B, L, 2 * proj_dim], layer 0 = [x; x], layer k = [forward_k; backward_k].

Positions where ``mask`` is 0 (padding) leave the LSTM state unchanged and output zeros, so
trailing padding never reaches the backward stack's valid positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models import layers as L
from t5x_like.models.config_checks import check_choices, check_sizes, strict_from_dict

TOKEN_ENCODERS = ("embedding", "char_cnn")
# Character ids of the char CNN: 0 = padding, byte b -> b + 1, begin / end of token.
CHAR_PAD, CHAR_BOW, CHAR_EOW = 0, 257, 258
CHAR_VOCAB_SIZE = 259


@dataclasses.dataclass(frozen=True)
class ElmoConfig:
    vocab_size: int = 8192
    proj_dim: int = 512  # x_t and every LSTM output (the paper's 512)
    lstm_dim: int = 4096  # LSTM cells per direction and layer
    num_layers: int = 2
    token_encoder: str = "embedding"  # TOKEN_ENCODERS
    max_chars: int = 50  # characters per token, BOW and EOW included (char_cnn)
    char_embed_dim: int = 16
    char_filter_widths: tuple = (1, 2, 3, 4, 5, 6, 7)
    char_filter_sizes: tuple = (32, 32, 64, 128, 256, 512, 1024)
    highway_layers: int = 2
    cell_clip: float = 3.0  # 0 = off
    proj_clip: float = 3.0  # 0 = off
    dropout_rate: float = 0.1  # on every LSTM layer's input
    init_std: float = 0.05
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False  # two layers are unrolled; kept for the fine-tuning schema

    def __post_init__(self):
        check_choices("ELMo", self, {"token_encoder": TOKEN_ENCODERS,
                                     "dtype": tuple(L.DTYPES), "param_dtype": tuple(L.DTYPES),
                                     "scan_layers": (False,)})
        check_sizes("ELMo", self, ("vocab_size", "proj_dim", "lstm_dim", "num_layers",
                                   "max_chars", "char_embed_dim"), ("dropout_rate",))
        widths, sizes = tuple(self.char_filter_widths), tuple(self.char_filter_sizes)
        if not widths or len(widths) != len(sizes) or min(sizes) < 1 or min(widths) < 1:
            raise UserError("ELMo config: char_filter_widths and char_filter_sizes must be "
                            "equally long lists of positive integers")
        if self.token_encoder == "char_cnn" and max(widths) > self.max_chars:
            raise UserError(f"ELMo config: a char filter of width {max(widths)} is wider than "
                            f"max_chars={self.max_chars}")
        if self.cell_clip < 0 or self.proj_clip < 0 or self.highway_layers < 0:
            raise UserError("ELMo config: cell_clip, proj_clip and highway_layers must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ElmoConfig:
        return strict_from_dict(cls, "ELMo", d)

    # What the fine-tuning code reads of an encoder's config (peft.dims_of, the head).
    @property
    def hidden_size(self) -> int:
        return 2 * self.proj_dim

    @property
    def num_heads(self) -> int:
        return 1

    @property
    def units(self) -> int:
        return self.num_layers


def _param(rngs, shape, names, c: ElmoConfig, init=None):
    return L.make_param(rngs, init or L.normal(c.init_std), shape, names,
                        L.dtype_of(c.param_dtype))


def lstm_step(params: Mapping[str, jax.Array], carry: tuple[jax.Array, jax.Array],
              x: jax.Array, *, cell_clip: float, proj_clip: float):
    """One LSTMP step: (h, c) [B, P], [B, H] and input x [B, D] -> new (h, c)."""
    h, c = carry
    gates = x @ params["w_input"] + h @ params["w_hidden"] + params["bias"]
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    if cell_clip:
        c = jnp.clip(c, -cell_clip, cell_clip)
    h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(x.dtype) @ params["w_proj"]
    if proj_clip:
        h = jnp.clip(h, -proj_clip, proj_clip)
    return h, c


class LSTMLayer(nnx.Module):
    """One direction of one layer: input [B, T, D] -> outputs [B, T, P]."""

    def __init__(self, input_dim: int, c: ElmoConfig, *, rngs: nnx.Rngs):
        h, p = c.lstm_dim, c.proj_dim
        self.w_input = _param(rngs, (input_dim, 4 * h), ("embed", "mlp"), c)
        self.w_hidden = _param(rngs, (p, 4 * h), ("embed", "mlp"), c)
        forget_one = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[h:2 * h].set(1.0)  # noqa: E731
        self.bias = _param(rngs, (4 * h,), ("mlp",), c, init=forget_one)
        self.w_proj = _param(rngs, (h, p), ("mlp", "embed"), c)
        self.cell_clip, self.proj_clip = c.cell_clip, c.proj_clip
        self.sizes = (h, p)

    def __call__(self, x: jax.Array, mask: jax.Array, *, reverse: bool) -> jax.Array:
        params = {k: getattr(self, k)[...] for k in ("w_input", "w_hidden", "bias", "w_proj")}
        h_size, p_size = self.sizes
        batch = x.shape[0]
        init = (jnp.zeros((batch, p_size), x.dtype), jnp.zeros((batch, h_size), jnp.float32))

        def step(carry, inputs):
            x_t, m_t = inputs
            h, c = lstm_step(params, carry, x_t, cell_clip=self.cell_clip,
                             proj_clip=self.proj_clip)
            keep = m_t[:, None]
            h, c = jnp.where(keep, h, carry[0]), jnp.where(keep, c, carry[1])
            return (h, c), jnp.where(keep, h, 0)

        _, out = jax.lax.scan(step, init, (jnp.swapaxes(x, 0, 1), jnp.swapaxes(mask, 0, 1)),
                              reverse=reverse)
        return jnp.swapaxes(out, 0, 1)


class CharCNN(nnx.Module):
    """Characters [B, T, C] -> token vectors [B, T, proj_dim] (module docstring)."""

    def __init__(self, c: ElmoConfig, *, rngs: nnx.Rngs):
        e = c.char_embed_dim
        self.char_embedding = _param(rngs, (CHAR_VOCAB_SIZE, e), ("vocab", "embed"), c,
                                     init=L.normal(1.0))
        # A width-w filter bank as one [w * e, n] kernel over unfolded windows.
        self.filters = nnx.List([_param(rngs, (w * e, n), ("embed", "mlp"), c)
                                 for w, n in zip(c.char_filter_widths, c.char_filter_sizes,
                                                 strict=True)])
        self.filter_bias = nnx.List([_param(rngs, (n,), ("mlp",), c, init=jax.nn.initializers.zeros)
                                     for n in c.char_filter_sizes])
        f = sum(c.char_filter_sizes)
        self.highway = nnx.List([_param(rngs, (f, 2 * f), ("embed", "mlp"), c)
                                 for _ in range(c.highway_layers)])
        # Highway carry-gate bias -2 (bilm-tf): layers start close to the identity.
        gate_bias = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[f:].set(-2.0)  # noqa: E731
        self.highway_bias = nnx.List([_param(rngs, (2 * f,), ("mlp",), c, init=gate_bias)
                                      for _ in range(c.highway_layers)])
        self.projection = _param(rngs, (f, c.proj_dim), ("mlp", "embed"), c)
        self.widths = tuple(c.char_filter_widths)

    def __call__(self, chars: jax.Array) -> jax.Array:
        x = jnp.take(self.char_embedding[...], chars, axis=0)  # [B, T, C, e]
        num = chars.shape[-1]
        pooled = []
        for w, kernel, bias in zip(self.widths, self.filters, self.filter_bias, strict=True):
            windows = jnp.concatenate([x[:, :, j:num - w + 1 + j] for j in range(w)], axis=-1)
            pooled.append(jnp.max(windows @ kernel[...] + bias[...], axis=2))
        y = jax.nn.relu(jnp.concatenate(pooled, axis=-1))
        f = y.shape[-1]
        for kernel, bias in zip(self.highway, self.highway_bias, strict=True):
            z = y @ kernel[...] + bias[...]
            transform, gate = jax.nn.relu(z[..., :f]), jax.nn.sigmoid(z[..., f:])
            y = gate * transform + (1.0 - gate) * y
        return y @ self.projection[...]


class Elmo(nnx.Module):
    """The biLM: ``hidden_states`` for features, ``logits`` through the shared softmax."""

    def __init__(self, c: ElmoConfig, *, rngs: nnx.Rngs):
        self.config = c
        if c.token_encoder == "char_cnn":
            self.char_cnn = CharCNN(c, rngs=rngs)
        else:
            self.token_embedding = _param(rngs, (c.vocab_size, c.proj_dim), ("vocab", "embed"),
                                          c, init=L.normal(1.0))
        self.forward_layers = nnx.List([LSTMLayer(c.proj_dim, c, rngs=rngs)
                                        for _ in range(c.num_layers)])
        self.backward_layers = nnx.List([LSTMLayer(c.proj_dim, c, rngs=rngs)
                                         for _ in range(c.num_layers)])
        self.softmax_kernel = _param(rngs, (c.proj_dim, c.vocab_size), ("embed", "vocab"), c)
        self.softmax_bias = _param(rngs, (c.vocab_size,), ("vocab",), c,
                                   init=jax.nn.initializers.zeros)

    def embed(self, tokens: jax.Array, chars: jax.Array | None) -> jax.Array:
        if self.config.token_encoder == "char_cnn":
            if chars is None:
                raise UserError("ELMo with token_encoder='char_cnn' needs each token's "
                                "characters")
            return self.char_cnn(chars).astype(L.dtype_of(self.config.dtype))
        return jnp.take(self.token_embedding[...], tokens, axis=0).astype(
            L.dtype_of(self.config.dtype))

    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None,
                 chars: jax.Array | None = None, enable_dropout: bool = False,
                 rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """``{'embeddings': [B, T, P], 'forward': [N, B, T, P], 'backward': [N, B, T, P]}``."""
        c = self.config
        x0 = self.embed(tokens, chars)
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        keys = L.dropout_keys(c.dropout_rate > 0, enable_dropout, rngs, 2 * c.num_layers)
        out = {}
        for name, stack, reverse in (("forward", self.forward_layers, False),
                                     ("backward", self.backward_layers, True)):
            x, states = x0, []
            for i, layer in enumerate(stack):
                key = keys[i + (c.num_layers if reverse else 0)]
                y = layer(L.dropout(x, c.dropout_rate, key), mask, reverse=reverse)
                x = y + x if i > 0 else y  # bilm-tf: residual around layers above the first
                states.append(x)
            out[name] = jnp.stack(states)
        out["embeddings"] = x0
        return out

    def hidden_states(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """[N + 1, B, T, 2P]: [x; x], then [forward_k; backward_k] for each layer k."""
        out = self(tokens, **kwargs)
        x0 = jnp.concatenate([out["embeddings"]] * 2, axis=-1)[None]
        layers = jnp.concatenate([out["forward"], out["backward"]], axis=-1)
        return jnp.concatenate([x0, layers], axis=0)

    def logits(self, h: jax.Array) -> jax.Array:
        """Float32 logits of the shared softmax for LSTM outputs h [..., P]."""
        return (jnp.einsum("...p,pv->...v", h.astype(jnp.float32),
                           self.softmax_kernel[...].astype(jnp.float32))
                + self.softmax_bias[...].astype(jnp.float32))
