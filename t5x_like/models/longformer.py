"""Longformer: a RoBERTa-layout encoder whose self-attention is a sliding window plus global tokens.

Each token attends to the w = ``attention_window // 2`` tokens on either side of it (keys
``i + dilation * k`` for ``|k| <= w``; transformers' ``attention_window`` is the full width, so
the same number means the same model) and to every *global* token; a global token
(``global_attention_mask`` = 1: [CLS], question tokens) attends to every token through its own
projections (``query_global`` / ``key_global`` / ``value_global``). Global keys are left out of
the window so no key counts twice, as in transformers' ``LongformerSelfAttention``.

Memory is linear in the length: the window scores are computed block by block (blocks of w
queries against the 3w keys of their block and its two neighbours, [B, heads, L/w, w, 3w]),
never as a masked L x L matrix; global rows and columns add [B, heads, L, G]. Dilation d
splits the sequence into d interleaved subsequences, each with an undilated window of w.
The sequence is padded inside the model to a multiple of ``w * dilation`` (padding is masked),
so any length runs.

Global tokens are gathered into ``G`` slots, a static number: eagerly (``interop.hf.load``'s
model) G is the largest count in the batch; under ``jax.jit`` it is ``max_global_tokens``, and
a row's global tokens past the first G stay local (they keep their window attention). Embeddings,
feed-forward, MLM head and the post-LN layer are the encoder's (``models/encoder.py``).
Numerically equal to transformers' ``LongformerModel`` (tests/test_longformer.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

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
from t5x_like.models.encoder import (
    Dense,
    Embeddings,
    FeedForward,
    MLMHead,
    _layer_norm,
)
from t5x_like.models.encoder_config import HIDDEN_ACTS

NEG = -1e30  # a masked score: exp underflows to 0 in float32


@dataclasses.dataclass(frozen=True)
class LongformerConfig:
    model_type: str = "longformer"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 4098
    position_offset: int = 2  # RoBERTa's: positions start at padding_idx + 1
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    pooler: bool = False
    mlm_head: bool = True
    attention_window: int = 512  # full width (transformers' meaning): w = 256 each side
    attention_dilation: int = 1
    max_global_tokens: int = 8  # global slots under jit (module docstring)
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    # What the shared encoder blocks read and Longformer does not vary.
    quantize: ClassVar[str] = "none"
    embedding_size: ClassVar[int] = 0

    def __post_init__(self):
        check_scan_unroll("longformer", self)
        check_choices("longformer", self, {
            "model_type": ("longformer",), "hidden_act": HIDDEN_ACTS,
            "dtype": tuple(L.DTYPES), "param_dtype": tuple(L.DTYPES),
            "remat_policy": tuple(L.REMAT_POLICIES)})
        check_sizes("longformer", self,
                    ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "attention_window", "attention_dilation"),
                    ("hidden_dropout_rate", "attention_dropout_rate"))
        if self.attention_window % 2:
            raise UserError(f"longformer attention_window={self.attention_window} must be even "
                            "(it is the full width, attention_window // 2 on each side)")
        if self.hidden_size % self.num_heads:
            raise UserError(f"longformer hidden_size={self.hidden_size} is not divisible by "
                            f"num_heads={self.num_heads}")
        if self.max_global_tokens < 0 or self.position_offset < 0 or self.type_vocab_size < 0:
            raise UserError("longformer max_global_tokens, position_offset and type_vocab_size "
                            "must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LongformerConfig:
        return strict_from_dict(cls, "longformer", d)

    @property
    def table_size(self) -> int:
        return self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window(self) -> int:
        """w: keys on each side of a query."""
        return self.attention_window // 2


# --------------------------------------------------------------------------- banded attention


def _windows(x: jax.Array, w: int) -> jax.Array:
    """[B, L, ...] (L = nb * w) -> [B, nb, 3w, ...]: each block's keys and its neighbours'."""
    blocks = x.reshape(x.shape[0], x.shape[1] // w, w, *x.shape[2:])
    pad = [(0, 0), (1, 1)] + [(0, 0)] * (blocks.ndim - 2)
    padded = jnp.pad(blocks, pad)
    return jnp.concatenate([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], axis=2)


def banded_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_ok: jax.Array, w: int, *,
                     global_k: jax.Array | None = None, global_v: jax.Array | None = None,
                     global_ok: jax.Array | None = None, dropout_rate: float = 0.0,
                     dropout_key: jax.Array | None = None) -> jax.Array:
    """Softmax attention of each query over keys ``i - w .. i + w`` (that are ``key_ok``) and
    the G global keys (``global_ok``), in one softmax; memory O(L * w + L * G).

    q, k, v [B, L, N, D] (q already scaled, L a multiple of w), key_ok [B, L] bool,
    global_k / global_v [B, G, N, D], global_ok [B, G] bool. Returns [B, L, N, D].
    """
    b, length, n, d = q.shape
    nb = length // w
    qb = q.reshape(b, nb, w, n, d)
    scores = jnp.einsum("bcqnd,bcknd->bncqk", qb, _windows(k, w),
                        preferred_element_type=jnp.float32)
    offset = np.arange(3 * w)[None, :] - w - np.arange(w)[:, None]  # key pos - query pos
    ok = _windows(key_ok, w)[:, None, :, None, :] & (np.abs(offset) <= w)
    scores = jnp.where(ok, scores, NEG)
    if global_k is not None:
        g = jnp.einsum("blnd,bgnd->bnlg", q, global_k, preferred_element_type=jnp.float32)
        g = jnp.where(global_ok[:, None, None, :], g, NEG).reshape(b, n, nb, w, -1)
        scores = jnp.concatenate([g, scores], axis=-1)
    probs = L.dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bncqk,bcknd->bcqnd", probs[..., -3 * w:], _windows(v, w))
    if global_k is not None:
        gp = probs[..., :-3 * w].reshape(b, n, length, -1)
        out = out + jnp.einsum("bnlg,bgnd->blnd", gp, global_v).reshape(out.shape)
    return out.reshape(b, length, n, d)


def _dilate(x: jax.Array, dilation: int) -> jax.Array:
    """[B, L, ...] -> [B * d, L / d, ...]: position i * d + r goes to subsequence r."""
    if dilation == 1:
        return x
    y = x.reshape(x.shape[0], x.shape[1] // dilation, dilation, *x.shape[2:])
    y = jnp.moveaxis(y, 2, 1)
    return y.reshape(x.shape[0] * dilation, x.shape[1] // dilation, *x.shape[2:])


def _undilate(y: jax.Array, dilation: int) -> jax.Array:
    if dilation == 1:
        return y
    b = y.shape[0] // dilation
    x = y.reshape(b, dilation, *y.shape[1:])
    x = jnp.moveaxis(x, 1, 2)
    return x.reshape(b, y.shape[1] * dilation, *y.shape[2:])


def _gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x[b, positions[b, p], ...] -> [B, P, ...]."""
    index = positions.reshape(*positions.shape, *(1,) * (x.ndim - 2)).astype(jnp.int32)
    return jnp.take_along_axis(x, index, axis=1)


def global_slots(is_global: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """([B, G] positions of the global tokens in order, padded with L; [B, G] which are real)."""
    length = is_global.shape[1]
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=num_slots, fill_value=length)[0])(is_global)
    return idx, idx < length


# --------------------------------------------------------------------------- layers


class LongformerSelfAttention(nnx.Module):
    """Local + global attention, output projection, then LN(x + attention)."""

    def __init__(self, c: LongformerConfig, *, rngs: nnx.Rngs):
        h, d, n = c.hidden_size, c.head_dim, c.num_heads
        heads = ((h,), (n, d), ("embed",), ("heads", "kv"))
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, Dense(*heads, c, rngs=rngs))
        self.out = Dense((n, d), (h,), ("heads", "kv"), ("embed",), c, rngs=rngs)
        self.norm = _layer_norm(h, c, rngs)
        self.scale = d ** -0.5
        self.window, self.dilation = c.window, c.attention_dilation
        self.rates = (c.attention_dropout_rate, c.hidden_dropout_rate)

    def __call__(self, x: jax.Array, valid: jax.Array, slots: tuple[jax.Array, jax.Array] | None,
                 key: jax.Array | None) -> jax.Array:
        """x [B, L, H] (L a multiple of w * dilation), valid [B, L] (real tokens), ``slots``
        from ``global_slots`` (None: no global tokens)."""
        k_local, k_global, k_out = L.split_key(key, 3)
        dt = x.dtype
        q = self.query(x) * jnp.asarray(self.scale, dt)
        k, v = self.key(x), self.value(x)
        key_ok = valid
        g = {}
        if slots is not None:
            idx, ok = slots
            safe = jnp.minimum(idx, x.shape[1] - 1)
            is_global = jnp.zeros_like(valid).at[jnp.arange(x.shape[0])[:, None], idx].set(
                ok, mode="drop")
            key_ok = valid & ~is_global
            g = dict(global_k=_gather(k, safe), global_v=_gather(v, safe), global_ok=ok)
            if self.dilation > 1:
                g = {name: jnp.repeat(a, self.dilation, axis=0) for name, a in g.items()}
        d = self.dilation
        y = _undilate(banded_attention(_dilate(q, d), _dilate(k, d), _dilate(v, d),
                                       _dilate(key_ok, d), self.window, **g,
                                       dropout_rate=self.rates[0], dropout_key=k_local), d)
        if slots is not None:  # global queries attend to every real token
            xg = _gather(x, safe)
            qg = self.query_global(xg) * jnp.asarray(self.scale, dt)
            s = jnp.einsum("bgnd,blnd->bngl", qg, self.key_global(x),
                           preferred_element_type=jnp.float32)
            s = jnp.where(valid[:, None, None, :], s, NEG)
            p = L.dropout(jax.nn.softmax(s, axis=-1), self.rates[0], k_global).astype(dt)
            yg = jnp.einsum("bngl,blnd->bgnd", p, self.value_global(x))
            rows = jnp.arange(x.shape[0])[:, None]
            y = y.at[rows, jnp.where(ok, idx, x.shape[1])].set(yg, mode="drop")
        return self.norm(x + L.dropout(self.out(y), self.rates[1], k_out))


class LongformerLayer(nnx.Module):
    def __init__(self, c: LongformerConfig, *, rngs: nnx.Rngs):
        self.attention = LongformerSelfAttention(c, rngs=rngs)
        self.ffn = FeedForward(c, rngs=rngs)


class LongformerStack(nnx.Module):
    def __init__(self, c: LongformerConfig, *, rngs: nnx.Rngs):
        self.layers = L.make_stack(lambda r: LongformerLayer(c, rngs=r), c.num_layers, rngs,
                                   scan=c.scan_layers)
        self.config = c

    def __call__(self, x, valid, slots, key, output_hidden_states: bool):
        c = self.config

        def body(layer, x, k):
            k_attn, k_ffn = L.split_key(k, 2)
            y = layer.ffn(layer.attention(x, valid, slots, k_attn), k_ffn)
            return y, (y if output_hidden_states else None)

        return L.run_stack(self.layers, x, L.layer_keys(key, c.num_layers), body,
                           scan=c.scan_layers, remat_policy=c.remat_policy,
                           unroll=c.scan_unroll)


class LongformerModel(nnx.Module):
    """Embeddings -> Longformer layers -> optional pooler and MLM head."""

    def __init__(self, config: LongformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embeddings = Embeddings(c, rngs=rngs)
        self.encoder = LongformerStack(c, rngs=rngs)
        if c.pooler:
            self.pooler = Dense((c.hidden_size,), (c.hidden_size,), ("embed",), ("mlp",), c,
                                rngs=rngs)
        if c.mlm_head:
            self.mlm = MLMHead(c, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        global_attention_mask: jax.Array | None = None,
        masked_positions: jax.Array | None = None,
        span_boundaries: jax.Array | None = None,
        output_hidden_states: bool = False,
        enable_dropout: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """transformers' argument names; [B, L] ids, mask 1 = token / 0 = padding,
        ``global_attention_mask`` 1 = global. Returns ``last_hidden_state`` [B, L, H]
        (+ ``hidden_states`` [N + 1, B, L, H], ``pooled_output``, ``mlm_logits`` [B, L, V] or
        at ``masked_positions`` [B, P])."""
        del span_boundaries  # no span-boundary head (the encoder families' shared call)
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        k_embed, k_layers = L.dropout_keys(
            bool(c.hidden_dropout_rate or c.attention_dropout_rate), enable_dropout, rngs, 2)
        x = L.dropout(self.embeddings(input_ids, token_type_ids), c.hidden_dropout_rate, k_embed)
        length = x.shape[1]
        unit = c.window * c.attention_dilation
        pad = -length % unit
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        valid = jnp.pad(attention_mask > 0, ((0, 0), (0, pad)))
        slots = None
        if global_attention_mask is not None:
            is_global = jnp.pad(global_attention_mask > 0, ((0, 0), (0, pad))) & valid
            if isinstance(is_global, jax.core.Tracer):
                num = c.max_global_tokens
            else:
                num = int(jnp.max(jnp.sum(is_global, axis=1)))
            slots = global_slots(is_global, num) if num else None
        hidden, per_layer = self.encoder(x, valid, slots, k_layers, output_hidden_states)
        hidden = hidden[:, :length]
        out = {"last_hidden_state": hidden}
        if output_hidden_states:
            out["hidden_states"] = jnp.concatenate([x[None], per_layer])[:, :, :length]
        if c.pooler:
            out["pooled_output"] = jnp.tanh(self.pooler(hidden[:, 0]))
        if c.mlm_head:
            selected = hidden if masked_positions is None else _gather(hidden, masked_positions)
            out["mlm_logits"] = self.mlm(selected, self.embeddings)
        return out


def extend_positions(table: np.ndarray, offset: int, new_rows: int) -> np.ndarray:
    """A position table of ``new_rows`` rows from a shorter one, as the Longformer paper
    initialises from RoBERTa: the ``offset`` reserved rows kept, then the learned rows
    (``table[offset:]``) copied over and over until the new table is full."""
    learned = table[offset:]
    if learned.shape[0] == 0:
        raise UserError(f"a position table of {table.shape[0]} rows has none past the offset "
                        f"{offset} to copy")
    reps = -(-(new_rows - offset) // learned.shape[0])
    return np.concatenate([table[:offset], np.tile(learned, (reps, 1))])[:new_rows]
