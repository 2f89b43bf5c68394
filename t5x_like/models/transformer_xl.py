"""Transformer-XL language model: segment recurrence with relative positional attention.

Each layer attends over [memory; segment]: the memory is that layer's *input* states of the
previous segment (the last ``mem_len`` of [old memory; inputs]), cached under stop-gradient,
so the context reaches ``num_layers x mem_len`` tokens back at the cost of one segment. Scores
are the paper's four-term decomposition with sinusoid relative encodings R and the learned
global biases u (``r_w_bias``) and v (``r_r_bias``), one pair per layer (``untie_r``)::

    score(i, j) = (q_i + u)·k_j            (a) content + (c) global content bias
                + (q_i + v)·(W_r R_{i-j})  (b) position + (d) global position bias

scaled by 1/sqrt(d_head), causal over the segment, every memory slot visible. Post-LN
layers, a ReLU feed-forward, the input embedding scaled by sqrt(d_model) and tied to the output
layer (+ a bias). transformers' ``TransfoXLLMHeadModel`` with ``cutoffs=[]``, ``div_val=1``,
``d_embed=d_model``, ``attn_type=0``, ``same_length=False`` and ``pre_lnorm=False`` is this
model exactly (tests/test_transformer_xl.py); its adaptive softmax / adaptive input with
several clusters is not implemented (the full softmax is what a 32k vocabulary needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models import layers as L
from t5x_like.models.config_checks import (
    check_choices,
    check_scan_unroll,
    check_sizes,
    strict_from_dict,
)

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig:
    vocab_size: int = 32000
    d_model: int = 512
    num_heads: int = 8
    d_head: int = 64
    d_ff: int = 2048
    num_layers: int = 16
    mem_len: int = 512  # memory slots per layer; 0 = no recurrence
    clamp_len: int = 1000  # relative distances clipped to clamp_len (0 = never)
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    def __post_init__(self):
        check_scan_unroll("Transformer-XL", self)
        check_choices("Transformer-XL", self, {
            "dtype": tuple(L.DTYPES), "param_dtype": tuple(L.DTYPES),
            "remat_policy": tuple(L.REMAT_POLICIES)})
        check_sizes("Transformer-XL", self,
                    ("vocab_size", "d_model", "num_heads", "d_head", "d_ff", "num_layers"),
                    ("dropout_rate", "attention_dropout_rate"))
        if self.mem_len < 0 or self.clamp_len < 0:
            raise UserError(f"Transformer-XL mem_len={self.mem_len} and clamp_len="
                            f"{self.clamp_len} must be >= 0 (0 turns them off)")
        if self.d_model % 2:
            raise UserError(f"Transformer-XL d_model={self.d_model} must be even (sinusoid "
                            "relative encodings pair sines and cosines)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformerXLConfig:
        return strict_from_dict(cls, "Transformer-XL", d)


class TransformerXLOutput(NamedTuple):
    logits: jax.Array  # float32 [B, T, V]
    hidden: jax.Array  # last layer's states [B, T, d_model]
    mems: jax.Array | None  # next segment's memory [layers, B, M, d_model]


def relative_encodings(key_length: int, d_model: int, clamp_len: int) -> np.ndarray:
    """Sinusoids [klen, d_model] for distances klen - 1, ..., 1, 0 (row r: klen - 1 - r)."""
    inv_freq = 1.0 / np.power(10000.0, np.arange(0, d_model, 2.0, dtype=np.float32) / d_model,
                              dtype=np.float32)
    pos = np.arange(key_length - 1, -1, -1.0, dtype=np.float32)
    if clamp_len > 0:
        pos = np.minimum(pos, clamp_len)
    angles = np.outer(pos, inv_freq).astype(np.float32)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def rel_shift(x: jax.Array) -> jax.Array:
    """[B, N, T, K] scores by relative row r (distance K - 1 - r) -> by key j (distance
    M + i - j, M = K - T), by the paper's pad-and-reshape skew; entries for j > M + i (future
    keys, masked anyway) hold scores of other rows."""
    b, n, t, k = x.shape
    padded = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (1, 0)))
    return padded.reshape(b, n, k + 1, t)[:, :, 1:].reshape(b, n, t, k)


class RelativeAttention(nnx.Module):
    """q/k/v/r projections without bias [embed, heads, kv], u and v biases, output, post-LN."""

    def __init__(self, c: TransformerXLConfig, *, rngs: nnx.Rngs):
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        shape, names = (c.d_model, c.num_heads, c.d_head), ("embed", "heads", "kv")
        self.query, self.key, self.value, self.position = (
            L.make_param(rngs, init, shape, names, pdt) for _ in range(4))
        self.out = L.make_param(rngs, init, (c.num_heads, c.d_head, c.d_model),
                                ("heads", "kv", "embed"), pdt)
        self.r_w_bias, self.r_r_bias = (
            L.make_param(rngs, init, (c.num_heads, c.d_head), ("heads", "kv"), pdt)
            for _ in range(2))
        self.norm = L.LayerNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=L.dtype_of(c.dtype),
                                param_dtype=pdt, rngs=rngs)
        self.scale = c.d_head ** -0.5
        self.rates = (c.attention_dropout_rate, c.dropout_rate)
        self.dtype = L.dtype_of(c.dtype)

    def __call__(self, h: jax.Array, mem: jax.Array | None, pos_enc: jax.Array,
                 key: jax.Array | None) -> jax.Array:
        k_att, k_out = L.split_key(key, 2)
        w = {n: getattr(self, n)[...].astype(self.dtype)
             for n in ("query", "key", "value", "position", "out", "r_w_bias", "r_r_bias")}
        context = h if mem is None else jnp.concatenate([mem.astype(h.dtype), h], axis=1)
        q = jnp.einsum("btd,dnh->btnh", h, w["query"])
        k = jnp.einsum("bkd,dnh->bknh", context, w["key"])
        v = jnp.einsum("bkd,dnh->bknh", context, w["value"])
        r = jnp.einsum("kd,dnh->knh", pos_enc.astype(h.dtype), w["position"])
        content = jnp.einsum("btnh,bknh->bntk", q + w["r_w_bias"], k,
                             preferred_element_type=jnp.float32)
        position = rel_shift(jnp.einsum("btnh,knh->bntk", q + w["r_r_bias"], r,
                                        preferred_element_type=jnp.float32))
        t, klen = h.shape[1], context.shape[1]
        causal = np.arange(klen)[None, :] <= np.arange(t)[:, None] + (klen - t)
        scores = jnp.where(causal, (content + position) * self.scale, NEG)
        probs = L.dropout(jax.nn.softmax(scores, axis=-1), self.rates[0], k_att)
        y = jnp.einsum("bntk,bknh->btnh", probs.astype(v.dtype), v)
        y = jnp.einsum("btnh,nhd->btd", y, w["out"])
        return self.norm(h + L.dropout(y, self.rates[1], k_out))


class FeedForward(nnx.Module):
    """LN(x + W2 ReLU(W1 x + b1) + b2), dropout after the ReLU and the output."""

    def __init__(self, c: TransformerXLConfig, *, rngs: nnx.Rngs):
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        zeros = jax.nn.initializers.zeros
        self.wi = L.make_param(rngs, init, (c.d_model, c.d_ff), ("embed", "mlp"), pdt)
        self.bi = L.make_param(rngs, zeros, (c.d_ff,), ("mlp",), pdt)
        self.wo = L.make_param(rngs, init, (c.d_ff, c.d_model), ("mlp", "embed"), pdt)
        self.bo = L.make_param(rngs, zeros, (c.d_model,), ("embed",), pdt)
        self.norm = L.LayerNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=L.dtype_of(c.dtype),
                                param_dtype=pdt, rngs=rngs)
        self.rate = c.dropout_rate

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        k1, k2 = L.split_key(key, 2)
        dt = x.dtype
        y = jax.nn.relu(x @ self.wi[...].astype(dt) + self.bi[...].astype(dt))
        y = L.dropout(y, self.rate, k1) @ self.wo[...].astype(dt) + self.bo[...].astype(dt)
        return self.norm(x + L.dropout(y, self.rate, k2))


class TransformerXLLayer(nnx.Module):
    def __init__(self, c: TransformerXLConfig, *, rngs: nnx.Rngs):
        self.attention = RelativeAttention(c, rngs=rngs)
        self.ffn = FeedForward(c, rngs=rngs)


class TransformerXL(nnx.Module):
    """The LM; ``__call__`` returns a ``TransformerXLOutput``."""

    def __init__(self, config: TransformerXLConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = L.dtype_of(c.param_dtype)
        self.word_embedding = L.make_param(rngs, L.normal(c.initializer_range),
                                           (c.vocab_size, c.d_model), ("vocab", "embed"), pdt)
        self.layers = L.make_stack(lambda r: TransformerXLLayer(c, rngs=r), c.num_layers, rngs,
                                   scan=c.scan_layers)
        self.lm_bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,),
                                    ("vocab",), pdt)

    def __call__(self, input_ids: jax.Array, *, mems: jax.Array | None = None,
                 enable_dropout: bool = False, rngs: nnx.Rngs | None = None
                 ) -> TransformerXLOutput:
        """Next-token logits for [B, T] ids after ``mems`` [layers, B, M, d_model] (the
        previous segments' memory; None = no context). Returns the next memory when
        ``mem_len`` > 0."""
        c = self.config
        dt = L.dtype_of(c.dtype)
        if mems is not None and (mems.shape[0] != c.num_layers or mems.shape[-1] != c.d_model):
            raise UserError(f"mems has shape {mems.shape}; this model needs [{c.num_layers}, "
                            f"batch, slots, {c.d_model}]")
        k_emb, k_pos, k_layers, k_out = L.dropout_keys(
            bool(c.dropout_rate or c.attention_dropout_rate), enable_dropout, rngs, 4)
        table = self.word_embedding[...]
        h = jnp.take(table, input_ids, axis=0).astype(dt) * jnp.asarray(c.d_model ** 0.5, dt)
        h = L.dropout(h, c.dropout_rate, k_emb)
        klen = input_ids.shape[1] + (0 if mems is None else mems.shape[2])
        pos_enc = L.dropout(jnp.asarray(relative_encodings(klen, c.d_model, c.clamp_len), dt),
                            c.dropout_rate, k_pos)

        def body(layer, h, xs):
            mem, key = xs
            new_mem = None
            if c.mem_len:
                cat = h if mem is None else jnp.concatenate([mem.astype(h.dtype), h], axis=1)
                new_mem = jax.lax.stop_gradient(cat[:, -c.mem_len:])
            k_att, k_ffn = L.split_key(key, 2)
            h = layer.ffn(layer.attention(h, mem, pos_enc, k_att), k_ffn)
            return h, new_mem

        h, new_mems = L.run_stack(self.layers, h, (mems, L.layer_keys(k_layers, c.num_layers)),
                                  body, scan=c.scan_layers, remat_policy=c.remat_policy,
                                  unroll=c.scan_unroll)
        out = L.dropout(h, c.dropout_rate, k_out)
        logits = L.dense(out, table.astype(dt), kernel_transposed=True,
                         preferred_element_type=jnp.float32)
        return TransformerXLOutput(logits + self.lm_bias[...].astype(jnp.float32), h, new_mems)
