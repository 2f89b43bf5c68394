"""XLNet as a Flax NNX module: two-stream relative attention with segment-level recurrence.

Two streams share every weight. The content stream h starts from the token embeddings and may
see its own token; the query stream g starts from one learned mask embedding per target and
sees the context but never its target's token (masks from ``objectives.permutation``). Each
layer is Transformer-XL attention: scores ``(q + r_w_bias)·k`` (content), ``(q + r_r_bias)·r``
(position, sinusoid relative encodings realigned by the rel-shift) and ``(q + r_s_bias)·s``
(same / different segment), scaled by 1/sqrt(d_head); then post-LN and a GELU feed-forward,
also post-LN. The previous segment's content states (``mems``, one per layer, stop-gradient)
are prepended to keys and values; each layer's input is cached as the next segment's memory.
The LM head is the word embedding (tied) plus a bias.

Numerically equal to ``transformers.XLNetLMHeadModel`` with ``attn_type="bi"``
(tests/test_xlnet_model.py), except that the query stream never sees its own token even where a
hand-made ``perm_mask`` would let it (transformers trusts the mask's diagonal).
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
from t5x_like.models.config_checks import check_choices, check_scan_unroll, strict_from_dict
from t5x_like.objectives.permutation import stream_masks

FF_ACTIVATIONS = ("gelu", "gelu_new", "relu")  # transformers' XLNet's, as in L.ACTIVATIONS
ATTN_TYPES = ("bi",)  # "uni" (causal XLNet) is not implemented


@dataclasses.dataclass(frozen=True)
class XLNetConfig:
    vocab_size: int = 32000
    d_model: int = 768  # XLNet-base; large is 1024 / 24 layers / 16 heads / 4096
    num_heads: int = 12
    num_layers: int = 12
    d_ff: int = 3072
    ff_activation: str = "gelu"
    attn_type: str = "bi"
    mem_len: int = 0  # memory slots returned per layer; 0 = no memory is returned
    reuse_len: int = 0  # cache only the first reuse_len tokens of a segment (0 = all)
    clamp_len: int = -1  # clip relative distances to +-clamp_len (-1 = never)
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; params stay param_dtype, logits float32
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    def __post_init__(self):
        check_scan_unroll("XLNet", self)
        check_choices("XLNet", self, {
            "ff_activation": FF_ACTIVATIONS,
            "attn_type": ATTN_TYPES,
            "dtype": tuple(L.DTYPES),
            "param_dtype": tuple(L.DTYPES),
            "remat_policy": tuple(L.REMAT_POLICIES),
        })
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff"):
            if getattr(self, name) < 1:
                raise UserError(f"XLNet config field {name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.num_heads:
            raise UserError(f"XLNet d_model={self.d_model} is not divisible by num_heads="
                            f"{self.num_heads}; pick num_heads dividing d_model")
        if self.mem_len < 0 or self.reuse_len < 0:
            raise UserError(f"XLNet mem_len={self.mem_len} and reuse_len={self.reuse_len} must "
                            "be >= 0 (0 turns them off)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> XLNetConfig:
        return strict_from_dict(cls, "XLNet", d)


class XLNetOutput(NamedTuple):
    logits: jax.Array  # float32 [B, P, V] (query stream at the targets) or [B, L, V] (content)
    hidden: jax.Array  # the content stream's last hidden states [B, L, d_model]
    mems: jax.Array | None  # next segment's memory [layers, B, M, d_model], or None


def rel_shift(x: jax.Array, key_length: int) -> jax.Array:
    """[B, N, T, R] scores against R = klen + T relative encodings -> [B, N, T, klen].

    Row i of the input is indexed by relative-encoding slot r (distance ``klen - r``); the
    output at (i, j) is the input at (i, T - i + j), i.e. distance ``mlen + i - j``. Done as
    Transformer-XL does, by a reshape that skews the rows, instead of a gather.
    """
    b, n, t, r = x.shape
    x = x.reshape(b, n, r, t)[:, :, 1:, :].reshape(b, n, t, r - 1)
    return x[..., :key_length]


def relative_encodings(query_length: int, key_length: int, d_model: int,
                       clamp_len: int) -> np.ndarray:
    """Sinusoids [klen + qlen, d_model] for distances klen, klen-1, ..., -qlen+1 ("bi")."""
    inv_freq = 1.0 / np.power(10000.0, np.arange(0, d_model, 2.0, dtype=np.float32) / d_model,
                              dtype=np.float32)
    pos = np.arange(key_length, -query_length, -1.0, dtype=np.float32)
    if clamp_len > 0:
        pos = np.clip(pos, -clamp_len, clamp_len)
    angles = np.einsum("i,d->id", pos, inv_freq.astype(np.float32))
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


class RelativeAttention(nnx.Module):
    """Transformer-XL attention with segment terms; kernels [embed, heads, kv], as XLNet's."""

    def __init__(self, c: XLNetConfig, *, rngs: nnx.Rngs):
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        shape, names = (c.d_model, c.num_heads, c.d_head), ("embed", "heads", "kv")
        self.query, self.key, self.value, self.out, self.position = (
            L.make_param(rngs, init, shape, names, pdt) for _ in range(5))
        bias_shape, bias_names = (c.num_heads, c.d_head), ("heads", "kv")
        self.r_w_bias, self.r_r_bias, self.r_s_bias = (
            L.make_param(rngs, init, bias_shape, bias_names, pdt) for _ in range(3))
        self.seg_embed = L.make_param(rngs, init, (2, c.num_heads, c.d_head),
                                      ("segments", "heads", "kv"), pdt)
        self.scale = c.d_head**-0.5
        self.dropout_rate = c.dropout_rate
        self.dtype = L.dtype_of(c.dtype)

    def project(self, x: jax.Array, name: str) -> jax.Array:
        return L.dense(x, getattr(self, name)[...].astype(self.dtype))

    def attend(self, q, k, v, pos_key, segment_diff, mask, dropout_key):
        """Attention of queries q [B, T, N, H] over keys/values [B, K, N, H]."""
        w = {name: getattr(self, name)[...].astype(self.dtype)
             for name in ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")}
        position = jnp.einsum("btnh,rnh->bntr", q + w["r_r_bias"], pos_key,
                              preferred_element_type=jnp.float32)
        bias = rel_shift(position, k.shape[1])
        if segment_diff is not None:
            seg = jnp.einsum("btnh,snh->bnts", q + w["r_s_bias"], w["seg_embed"],
                             preferred_element_type=jnp.float32)
            bias = bias + jnp.where(segment_diff[:, None], seg[..., 1:], seg[..., :1])
        mask = None if mask is None else mask[:, None]
        return L.attention((q + w["r_w_bias"]) * self.scale, k, v, bias=bias * self.scale,
                           mask=mask, dropout_rate=self.dropout_rate, dropout_key=dropout_key)

    def output(self, y: jax.Array) -> jax.Array:
        return L.dense(y, self.out[...].astype(self.dtype), contract=2, kernel_transposed=True)


class XLNetLayer(nnx.Module):
    """Two-stream attention then the feed-forward, each post-LN, on both streams."""

    def __init__(self, c: XLNetConfig, *, rngs: nnx.Rngs):
        dt, pdt = L.dtype_of(c.dtype), L.dtype_of(c.param_dtype)
        norm = dict(eps=c.layer_norm_epsilon, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.attention = RelativeAttention(c, rngs=rngs)
        self.attention_norm = L.LayerNorm(c.d_model, **norm)
        self.mlp = L.FeedForward(
            c.d_model, c.d_ff, activation=c.ff_activation, gated=False, use_bias=True,
            init_std=c.initializer_range, out_init_std=c.initializer_range,
            dropout_rate=c.dropout_rate, dtype=dt, param_dtype=pdt, rngs=rngs,
            bias_names={"wi": "bi", "wo": "bo"})  # XLNet's names (checkpoint paths)
        self.mlp_norm = L.LayerNorm(c.d_model, **norm)
        self.dropout_rate = c.dropout_rate

    def __call__(self, h, g, mem, *, pos_enc, segment_diff, content_mask, query_mask,
                 target_mapping, dropout_key):
        keys = L.split_key(dropout_key, 8)
        att = self.attention
        context = h if mem is None else jnp.concatenate([mem.astype(h.dtype), h], axis=1)
        k, v = att.project(context, "key"), att.project(context, "value")
        pos_key = jnp.einsum("rd,dnh->rnh", pos_enc.astype(h.dtype),
                             att.position[...].astype(h.dtype))

        def finish(x, y, i):
            y = L.dropout(att.output(y), self.dropout_rate, keys[i])
            x = self.attention_norm(x + y)
            y = L.dropout(self.mlp(x, keys[i + 1]), self.dropout_rate, keys[i + 2])
            return self.mlp_norm(x + y)

        y = att.attend(att.project(h, "query"), k, v, pos_key, segment_diff, content_mask,
                       keys[0])
        new_h = finish(h, y, 1)
        if g is None:
            return new_h, None
        # Each target's query sits at its position (for the relative distances), then back.
        tm = target_mapping.astype(h.dtype)
        q = jnp.einsum("bpnh,bpl->blnh", att.project(g, "query"), tm)
        y = att.attend(q, k, v, pos_key, segment_diff, query_mask, keys[4])
        return new_h, finish(g, jnp.einsum("blnh,bpl->bpnh", y, tm), 5)


class XLNet(nnx.Module):
    """XLNet with its LM head; ``__call__`` returns an ``XLNetOutput``."""

    def __init__(self, config: XLNetConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        self.word_embedding = L.make_param(rngs, init, (c.vocab_size, c.d_model),
                                           ("vocab", "embed"), pdt)
        self.mask_emb = L.make_param(rngs, init, (c.d_model,), ("embed",), pdt)
        self.layers = L.make_stack(lambda r: XLNetLayer(c, rngs=r), c.num_layers, rngs,
                                   scan=c.scan_layers)
        self.lm_bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,),
                                    ("vocab",), pdt)

    def _cache(self, h: jax.Array, mem: jax.Array | None, mem_len: int) -> jax.Array:
        """This layer's memory for the next segment: the last mem_len of [mem; h], no grad."""
        if self.config.reuse_len:
            h = h[:, :self.config.reuse_len]
        cat = h if mem is None else jnp.concatenate([mem.astype(h.dtype), h], axis=1)
        return jax.lax.stop_gradient(cat[:, -mem_len:])

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        perm_mask: jax.Array | None = None,
        target_mapping: jax.Array | None = None,
        mems: jax.Array | None = None,
        mem_mask: jax.Array | None = None,
        mem_len: int | None = None,
        enable_dropout: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> XLNetOutput:
        """Runs both streams (the query stream only with ``target_mapping``).

        ``attention_mask`` [B, L] is 0 on padding; ``perm_mask`` [B, L, L] is non-zero where i
        cannot see j; ``target_mapping`` [B, P, L] one-hot picks the P predicted positions;
        ``mems`` [layers, B, M, d_model] is the previous segment's memory, visible to every
        position, except slots where ``mem_mask`` [B, M] is 0 (a fixed-size memory that is not
        full yet, as generation keeps). ``mem_len`` overrides the config's count of memory slots
        returned per layer (generation asks for all of [mems; segment]). Without perm_mask,
        attention_mask, mem_mask and target_mapping, attention is fully bidirectional.
        """
        c = self.config
        dt = L.dtype_of(c.dtype)
        batch, length = input_ids.shape
        mem_length = 0 if mems is None else mems.shape[2]
        if mems is not None and mems.shape[0] != c.num_layers:
            raise UserError(f"mems has {mems.shape[0]} layers but the model has {c.num_layers}")
        k_h, k_g, k_pos, k_layers, k_out = L.dropout_keys(c.dropout_rate > 0, enable_dropout,
                                                          rngs, 5)

        mem_len = c.mem_len if mem_len is None else mem_len
        if mems is None and mem_mask is not None:
            raise UserError("mem_mask needs mems (it marks which memory slots are filled)")
        if (perm_mask is None and attention_mask is None and target_mapping is None
                and mem_mask is None):
            content_mask = query_mask = None
        else:
            if perm_mask is None:
                perm_mask = jnp.zeros((batch, length, length), bool)
            content_mask, query_mask = stream_masks(perm_mask, attention_mask, mem_length)
            if mem_mask is not None:
                visible = jnp.concatenate([mem_mask > 0, jnp.ones((batch, length), bool)], 1)
                content_mask = content_mask & visible[:, None, :]
                query_mask = query_mask & visible[:, None, :]

        segment_diff = None
        if token_type_ids is not None:  # memory slots count as segment 0, as in the reference
            token_type_ids = jnp.asarray(token_type_ids, jnp.int32)
            all_ids = jnp.concatenate(
                [jnp.zeros((batch, mem_length), jnp.int32), token_type_ids], axis=1)
            segment_diff = token_type_ids[:, :, None] != all_ids[:, None, :]

        table = self.word_embedding[...]
        h = L.dropout(jnp.take(table, input_ids, axis=0).astype(dt), c.dropout_rate, k_h)
        g = None
        if target_mapping is not None:
            g = jnp.broadcast_to(self.mask_emb[...].astype(dt),
                                 (batch, target_mapping.shape[1], c.d_model))
            g = L.dropout(g, c.dropout_rate, k_g)
        pos_enc = relative_encodings(length, mem_length + length, c.d_model, c.clamp_len)
        pos_enc = L.dropout(jnp.asarray(pos_enc, dt), c.dropout_rate, k_pos)

        def body(layer, carry, xs):
            h, g = carry
            mem, key = xs
            new_mem = self._cache(h, mem, mem_len) if mem_len else None
            h, g = layer(h, g, mem, pos_enc=pos_enc, segment_diff=segment_diff,
                         content_mask=content_mask, query_mask=query_mask,
                         target_mapping=target_mapping, dropout_key=key)
            return (h, g), new_mem

        (h, g), new_mems = L.run_stack(self.layers, (h, g),
                                       (mems, L.layer_keys(k_layers, c.num_layers)), body,
                                       scan=c.scan_layers, remat_policy=c.remat_policy,
                                       unroll=c.scan_unroll)
        out = L.dropout(h if g is None else g, c.dropout_rate, k_out)
        logits = L.dense(out, table.astype(dt), kernel_transposed=True,
                         preferred_element_type=jnp.float32)
        return XLNetOutput(logits + self.lm_bias[...].astype(jnp.float32), h, new_mems)
