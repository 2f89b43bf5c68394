"""Reformer: LSH self-attention, reversible residual layers and a chunked feed-forward.

**LSH attention** (shared QK). One projection gives queries and keys; each position is hashed
``num_hashes`` times by a random rotation into ``num_buckets`` buckets (argmax over
[xR; -xR]), positions are sorted by (hash round, bucket, position) and cut into chunks of
``lsh_chunk_length``; each chunk attends to itself and ``lsh_num_chunks_before`` /
``_after`` neighbouring chunks, with keys length-normalised (x / rms(x) / sqrt(d)), causal
and padding masks by original position, and a token attends to itself only when nothing else is
available (score -1e5). The rounds are combined with weights softmax(logsumexp of each round).
Scores are [B, heads, rounds x L / chunk, chunk, chunk x (1 + before + after)]: memory linear
in the length. Rotations are drawn from ``hash_key`` (fresh each training step) or, for
scoring, from ``hash_seed``; a caller may pass them (``rotations``) to reproduce another
implementation's hashes.

**Reversible layers** (``reversible=True``). The stream is two halves, both the embedding
at first: ``y1 = x1 + Attention(x2)``, ``y2 = x2 + FeedForward(y1)``, output
LayerNorm([y1; y2]) (2 x hidden wide). The stack is a ``jax.custom_vjp`` that keeps only its
output: the backward pass recomputes each layer's inputs from its outputs
(``x2 = y2 - FF(y1)``, ``x1 = y1 - Attn(x2)``), so activation memory does not grow with depth.
``reversible=False`` runs the same arithmetic under ordinary autodiff (the reference the tests
compare gradients with). The feed-forward runs over ``chunk_size_feed_forward`` positions at a
time (0 = all at once). Numerically equal to transformers' ``ReformerModel`` with only "lsh"
layers, an int ``num_buckets``, plain position embeddings and the same rotations
(tests/test_reformer.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models import layers as L
from t5x_like.models.config_checks import check_choices, check_sizes, strict_from_dict

MASKED, SELF = -1e9, -1e5  # transformers' float32 values


@dataclasses.dataclass(frozen=True)
class ReformerConfig:
    vocab_size: int = 320
    hidden_size: int = 256
    num_heads: int = 2
    head_dim: int = 64
    feed_forward_size: int = 512
    num_layers: int = 6
    hidden_act: str = "relu"
    max_position_embeddings: int = 4096
    num_buckets: int = 64
    num_hashes: int = 1
    lsh_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    chunk_size_feed_forward: int = 0  # 0 = the whole sequence at once
    causal: bool = True
    hash_seed: int = 0  # rotations when no hash_key is given (scoring)
    reversible: bool = True
    layer_norm_eps: float = 1e-12
    hidden_dropout_rate: float = 0.05
    attention_dropout_rate: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True  # lax.scan over the stacked layers, else a Python loop

    def __post_init__(self):
        check_choices("Reformer", self, {
            "hidden_act": ("relu", "gelu", "gelu_new"), "dtype": tuple(L.DTYPES),
            "param_dtype": tuple(L.DTYPES)})
        check_sizes("Reformer", self,
                    ("vocab_size", "hidden_size", "num_heads", "head_dim", "feed_forward_size",
                     "num_layers", "max_position_embeddings", "num_buckets", "num_hashes",
                     "lsh_chunk_length"),
                    ("hidden_dropout_rate", "attention_dropout_rate"))
        if self.num_buckets % 2:
            raise UserError(f"Reformer num_buckets={self.num_buckets} must be even (a rotation "
                            "gives num_buckets / 2 directions and their negatives)")
        if min(self.lsh_num_chunks_before, self.lsh_num_chunks_after,
               self.chunk_size_feed_forward) < 0:
            raise UserError("Reformer lsh_num_chunks_before/after and chunk_size_feed_forward "
                            "must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReformerConfig:
        return strict_from_dict(cls, "Reformer", d)

    @property
    def rotation_shape(self) -> tuple[int, int, int, int]:
        """One layer's rotations: [heads, head_dim, num_hashes, num_buckets / 2]."""
        return (self.num_heads, self.head_dim, self.num_hashes, self.num_buckets // 2)


# --------------------------------------------------------------------------- LSH attention


def _adjacent(x: jax.Array, before: int, after: int) -> jax.Array:
    """[B, N, C, chunk, ...] -> [B, N, C, chunk * (1 + before + after), ...]: each chunk with
    its neighbours (cyclically, as the reference)."""
    parts = [jnp.roll(x, -i, axis=2) for i in range(-before, after + 1)]
    return jnp.concatenate(parts, axis=3)


def lsh_attention(qk: jax.Array, v: jax.Array, rotations: jax.Array, mask: jax.Array | None,
                  c: ReformerConfig, dropout_key: jax.Array | None = None) -> jax.Array:
    """qk, v [B, N, L, D] (L a multiple of the chunk length), rotations [N, D, H, K/2], mask
    [B, L] (True = token) -> [B, N, L, D]."""
    b, n, length, d = qk.shape
    h, chunk = c.num_hashes, c.lsh_chunk_length
    rotated = jnp.einsum("bnld,ndhr->bnhlr", jax.lax.stop_gradient(qk), rotations)
    buckets = jnp.argmax(jnp.concatenate([rotated, -rotated], -1), -1)  # [B, N, H, L]
    num_buckets = c.num_buckets
    if mask is not None:  # padding gets a bucket of its own, sorted last
        num_buckets += 1
        buckets = jnp.where(mask[:, None, None, :], buckets, c.num_buckets)
    flat = (buckets + (jnp.arange(h) * num_buckets)[:, None]).reshape(b, n, h * length)
    order = jnp.argsort(flat, axis=-1, stable=True)
    undo = jnp.argsort(order, axis=-1)
    pos = order % length  # [B, N, H * L]: the original position of each sorted slot

    def gather(x):
        return jnp.take_along_axis(x, pos[..., None], axis=2)

    chunks = h * length // chunk
    sq = gather(qk).reshape(b, n, chunks, chunk, d)
    sv = gather(v).reshape(b, n, chunks, chunk, d)
    keys = sq * jax.lax.rsqrt(jnp.mean(sq * sq, -1, keepdims=True) + 1e-6) / np.sqrt(d)
    before, after = c.lsh_num_chunks_before, c.lsh_num_chunks_after
    keys, sv = _adjacent(keys, before, after), _adjacent(sv, before, after)
    q_pos = pos.reshape(b, n, chunks, chunk)
    k_pos = _adjacent(q_pos, before, after)
    dots = jnp.einsum("bncqd,bnckd->bncqk", sq, keys, preferred_element_type=jnp.float32)
    ok = None
    if mask is not None:
        ok = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, None, :], (b, n, 1, length)),
                                 k_pos.reshape(b, n, 1, -1), axis=-1).reshape(k_pos.shape)
        ok = jnp.broadcast_to(ok[:, :, :, None, :], dots.shape)
    if c.causal:
        causal = q_pos[..., :, None] >= k_pos[..., None, :]
        ok = causal if ok is None else ok & causal
    if ok is not None:
        dots = jnp.where(ok, dots, MASKED)
    dots = jnp.where(q_pos[..., :, None] != k_pos[..., None, :], dots, SELF)
    logits = jax.nn.logsumexp(dots, axis=-1, keepdims=True)
    probs = L.dropout(jnp.exp(dots - logits), c.attention_dropout_rate, dropout_key)
    out = jnp.einsum("bncqk,bnckd->bncqd", probs.astype(sv.dtype), sv)
    out = jnp.take_along_axis(out.reshape(b, n, h * length, d), undo[..., None], axis=2)
    logits = jnp.take_along_axis(logits.reshape(b, n, h * length), undo, axis=2)
    if h == 1:
        return out
    out, logits = out.reshape(b, n, h, length, d), logits.reshape(b, n, h, length, 1)
    weights = jnp.exp(logits - jax.nn.logsumexp(logits, axis=2, keepdims=True))
    return jnp.sum(out * weights.astype(out.dtype), axis=2)


# --------------------------------------------------------------------------- layers


def _layer_norm(dim: int, c: ReformerConfig, rngs: nnx.Rngs) -> L.LayerNorm:
    return L.LayerNorm(dim, eps=c.layer_norm_eps, dtype=L.dtype_of(c.dtype),
                       param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)


class ReformerLayer(nnx.Module):
    """Attention half (LN, shared-QK LSH attention, output) and feed-forward half (LN, dense,
    activation, dense)."""

    def __init__(self, c: ReformerConfig, *, rngs: nnx.Rngs):
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        zeros = jax.nn.initializers.zeros
        heads = (c.hidden_size, c.num_heads, c.head_dim)
        self.attention_norm = _layer_norm(c.hidden_size, c, rngs)
        self.query_key = L.make_param(rngs, init, heads, ("embed", "heads", "kv"), pdt)
        self.value = L.make_param(rngs, init, heads, ("embed", "heads", "kv"), pdt)
        self.out = L.make_param(rngs, init, (c.num_heads, c.head_dim, c.hidden_size),
                                ("heads", "kv", "embed"), pdt)
        self.ffn_norm = _layer_norm(c.hidden_size, c, rngs)
        self.wi = L.make_param(rngs, init, (c.hidden_size, c.feed_forward_size),
                               ("embed", "mlp"), pdt)
        self.bi = L.make_param(rngs, zeros, (c.feed_forward_size,), ("mlp",), pdt)
        self.wo = L.make_param(rngs, init, (c.feed_forward_size, c.hidden_size),
                               ("mlp", "embed"), pdt)
        self.bo = L.make_param(rngs, zeros, (c.hidden_size,), ("embed",), pdt)
        self.config = c

    def attend(self, x: jax.Array, rotations: jax.Array, mask: jax.Array | None,
               keys: jax.Array | None) -> jax.Array:
        c, dt = self.config, x.dtype
        k_att, k_out = L.split_key(keys, 2)
        y = self.attention_norm(x)
        qk = jnp.einsum("bld,dnh->bnlh", y, self.query_key[...].astype(dt))
        v = jnp.einsum("bld,dnh->bnlh", y, self.value[...].astype(dt))
        o = lsh_attention(qk, v, rotations.astype(dt), mask, c, k_att)
        o = jnp.einsum("bnlh,nhd->bld", o, self.out[...].astype(dt))
        return L.dropout(o, c.hidden_dropout_rate, k_out)

    def feed_forward(self, x: jax.Array, keys: jax.Array | None) -> jax.Array:
        c, dt = self.config, x.dtype
        k1, k2 = L.split_key(keys, 2)

        def run(x, k1, k2):
            y = self.ffn_norm(x) @ self.wi[...].astype(dt) + self.bi[...].astype(dt)
            y = L.ACTIVATIONS[c.hidden_act](L.dropout(y, c.hidden_dropout_rate, k1))
            y = y @ self.wo[...].astype(dt) + self.bo[...].astype(dt)
            return L.dropout(y, c.hidden_dropout_rate, k2)

        size = c.chunk_size_feed_forward
        if not size or size >= x.shape[1]:
            return run(x, k1, k2)
        if x.shape[1] % size:
            raise UserError(f"the sequence length {x.shape[1]} is not a multiple of "
                            f"chunk_size_feed_forward={size}")
        chunks = jnp.moveaxis(x.reshape(x.shape[0], -1, size, x.shape[2]), 1, 0)
        if k1 is None:
            out = jax.lax.map(lambda xc: run(xc, None, None), chunks)
        else:
            ks = jax.random.split(k1, (chunks.shape[0], 2))
            out = jax.lax.map(lambda a: run(a[0], a[1][0], a[1][1]), (chunks, ks))
        return jnp.moveaxis(out, 0, 1).reshape(x.shape)


# --------------------------------------------------------------------------- the stack


def _key(aux: dict, name: str) -> jax.Array | None:
    return jax.random.wrap_key_data(aux[name]) if name in aux else None


def _layer_fns(graphdef: nnx.GraphDef, mask: jax.Array | None):
    def f(state, x2, aux):
        return nnx.merge(graphdef, state).attend(x2, aux["rotations"], mask, _key(aux, "k_att"))

    def g(state, y1, aux):
        return nnx.merge(graphdef, state).feed_forward(y1, _key(aux, "k_ffn"))

    return f, g


def _layer_at(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda a: a[i], tree)


def _forward(graphdef, mask, scan, state, x1, x2, aux):
    """(y1, y2) after every layer, by plain autodiff-able arithmetic."""
    f, g = _layer_fns(graphdef, mask)

    def step(carry, xs):
        x1, x2 = carry
        layer, a = xs
        y1 = x1 + f(layer, x2, a)
        return (y1, x2 + g(layer, y1, a)), None

    if scan:
        return jax.lax.scan(step, (x1, x2), (state, aux))[0]
    carry = (x1, x2)
    for i in range(jax.tree.leaves(aux)[0].shape[0]):
        carry, _ = step(carry, (_layer_at(state, i), _layer_at(aux, i)))
    return carry


def reversible_stack(graphdef, state, x1, x2, aux, mask, *, scan: bool):
    """``_forward`` with a backward pass that recomputes each layer's inputs from its outputs
    instead of storing them (module docstring). ``aux`` holds per-layer rotations and dropout
    keys (raw uint32 key data), so the recomputation sees the same hashes and masks."""
    f, g = _layer_fns(graphdef, mask)

    @jax.custom_vjp
    def run(state, x1, x2, aux):
        return _forward(graphdef, mask, scan, state, x1, x2, aux)

    def fwd(state, x1, x2, aux):
        y1, y2 = run(state, x1, x2, aux)
        return (y1, y2), (state, y1, y2, aux)

    def bwd(res, cotangents):
        state, y1, y2, aux = res
        dy1, dy2 = cotangents

        def back(carry, xs):
            y1, y2, dy1, dy2 = carry
            layer, a = xs
            g_out, g_vjp = jax.vjp(lambda p, y: g(p, y, a), layer, y1)
            dp_g, dy1_g = g_vjp(dy2)
            x2 = y2 - g_out
            dy1 = dy1 + dy1_g
            f_out, f_vjp = jax.vjp(lambda p, x: f(p, x, a), layer, x2)
            dp_f, dx2_f = f_vjp(dy1)
            x1 = y1 - f_out
            dp = jax.tree.map(jnp.add, dp_f, dp_g)
            return (x1, x2, dy1, dy2 + dx2_f), dp

        (_, _, dx1, dx2), dstate = jax.lax.scan(back, (y1, y2, dy1, dy2), (state, aux),
                                                reverse=True)
        daux = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0)
                            if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a),
                            aux)
        return dstate, dx1, dx2, daux

    run.defvjp(fwd, bwd)
    return run(state, x1, x2, aux)


class Reformer(nnx.Module):
    """Embeddings -> reversible LSH layers -> LayerNorm over [y1; y2] -> optional LM head."""

    def __init__(self, config: ReformerConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        c = config
        self.config = c
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        self.word_embeddings = L.make_param(rngs, init, (c.vocab_size, c.hidden_size),
                                            ("vocab", "embed"), pdt)
        self.position_embeddings = L.make_param(
            rngs, init, (c.max_position_embeddings, c.hidden_size), ("position", "embed"), pdt)
        self.layers = L.make_stack(lambda r: ReformerLayer(c, rngs=r), c.num_layers, rngs,
                                   scan=True)
        self.norm = _layer_norm(2 * c.hidden_size, c, rngs)
        if lm_head:
            self.lm_head = L.make_param(rngs, init, (2 * c.hidden_size, c.vocab_size),
                                        ("embed", "vocab"), pdt)
            self.lm_bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,),
                                        ("vocab",), pdt)

    def rotations(self, key: jax.Array | None) -> jax.Array:
        """[layers, heads, head_dim, num_hashes, num_buckets / 2] random rotations."""
        c = self.config
        key = jax.random.key(c.hash_seed) if key is None else key
        return jax.random.normal(key, (c.num_layers, *c.rotation_shape), jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 hash_key: jax.Array | None = None, rotations: jax.Array | None = None,
                 enable_dropout: bool = False, rngs: nnx.Rngs | None = None
                 ) -> dict[str, jax.Array]:
        """``last_hidden_state`` [B, L, 2 x hidden] (and ``logits`` [B, L, V] with the LM
        head) for [B, L] ids; L is padded inside to a multiple of the chunk length."""
        c = self.config
        dt = L.dtype_of(c.dtype)
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise UserError(f"sequence length {length} exceeds max_position_embeddings="
                            f"{c.max_position_embeddings}")
        pad = -length % c.lsh_chunk_length
        if pad and length + pad > c.max_position_embeddings:
            raise UserError(f"sequence length {length} padded to a multiple of "
                            f"lsh_chunk_length={c.lsh_chunk_length} exceeds "
                            f"max_position_embeddings={c.max_position_embeddings}")
        if pad and attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if attention_mask is not None:
            attention_mask = jnp.pad(attention_mask, ((0, 0), (0, pad)))
        ids = jnp.pad(input_ids, ((0, 0), (0, pad)))
        k_emb, k_pos, k_layers, k_out = L.dropout_keys(
            bool(c.hidden_dropout_rate or c.attention_dropout_rate), enable_dropout, rngs, 4)
        x = L.dropout(jnp.take(self.word_embeddings[...], ids, axis=0).astype(dt),
                      c.hidden_dropout_rate, k_emb)
        positions = self.position_embeddings[: ids.shape[1]].astype(dt)
        x = x + L.dropout(jnp.broadcast_to(positions, x.shape), c.hidden_dropout_rate, k_pos)
        aux = {"rotations": self.rotations(hash_key) if rotations is None else rotations}
        if k_layers is not None:
            keys = jax.random.key_data(jax.random.split(k_layers, (c.num_layers, 2)))
            aux["k_att"], aux["k_ffn"] = keys[:, 0], keys[:, 1]  # raw: custom_vjp arguments
        mask = None if attention_mask is None else attention_mask > 0
        graphdef, state = nnx.split(self.layers)
        if c.reversible:
            y1, y2 = reversible_stack(graphdef, state, x, x, aux, mask, scan=c.scan_layers)
        else:
            y1, y2 = _forward(graphdef, mask, c.scan_layers, state, x, x, aux)
        h = L.dropout(self.norm(jnp.concatenate([y1, y2], -1)), c.hidden_dropout_rate, k_out)
        h = h[:, :length]
        out = {"last_hidden_state": h}
        if hasattr(self, "lm_head"):
            out["logits"] = L.dense(h, self.lm_head[...].astype(dt),
                                    preferred_element_type=jnp.float32) + self.lm_bias[...]
        return out
