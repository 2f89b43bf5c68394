"""GPT-style decoder-only Transformer LM: GPT-2 by default; rotary / RMSNorm / gated MLP by config.

Pre-LN layers (LayerNorm with bias, or RMSNorm), learned absolute positions or rotary ones
(RoPE, rotate-half convention as GPT-NeoX and Llama), attention scaled by 1/sqrt(d_kv) with
optional biases, GELU-tanh ("gelu_new") feed-forward or a gated one (SwiGLU with ``silu``),
final norm, tied or untied head. Equal to ``transformers.GPT2LMHeadModel`` (and, by config, to
GPT-NeoX and Llama): tests/test_decoder_lm.py.

Attention is causal, restricted to a document when ``segment_ids`` are given (packed rows;
segment 0 = padding), or given outright by ``attention_mask`` [B, L, L] (prefix LM / UniLM).
The blocks with biases (``LayerNorm``, ``MultiHeadAttention``, ``FeedForward``) live in
models/layers.py, shared with BART.
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
from t5x_like.models.activation_sharding import HIDDEN, LOGITS, constrain
from t5x_like.models.config_checks import (
    check_choices,
    check_scan_unroll,
    check_sizes,
    strict_from_dict,
)

POSITION_EMBEDDINGS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
POSITION_AXIS = "position"  # rows of a learned position table (replicated: no rule maps it)


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig:
    vocab_size: int = 50257
    d_model: int = 768
    num_heads: int = 12
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    max_length: int = 1024  # rows of the learned position table (the longest sequence)
    position_embedding: str = "learned"  # "learned" (GPT-2) | "rotary" (RoPE)
    rotary_base: float = 10000.0
    norm: str = "layernorm"  # "layernorm" (scale + bias) | "rmsnorm" (scale only)
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    gated_mlp: bool = False  # act(x W0) * (x W1), then Wo (SwiGLU with activation="silu")
    use_bias: bool = True  # biases in attention and MLP projections (GPT-2: yes, Llama: no)
    tie_word_embeddings: bool = True  # logits = y @ E^T (GPT-2); else a separate lm_head
    dropout_rate: float = 0.0  # embeddings and residual branches
    attention_dropout_rate: float = 0.0
    init_std: float = 0.02  # GPT-2: N(0, 0.02); residual projections / sqrt(2 * num_layers)
    dtype: str = "float32"  # compute dtype; params stay param_dtype, logits float32
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"  # "none" | "minimal" | "dots" | "full"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    def __post_init__(self):
        check_scan_unroll("decoder LM", self)
        check_choices("decoder LM", self, {
            "position_embedding": POSITION_EMBEDDINGS, "norm": NORMS,
            "activation": tuple(L.ACTIVATIONS), "dtype": tuple(L.DTYPES),
            "param_dtype": tuple(L.DTYPES), "remat_policy": tuple(L.REMAT_POLICIES)})
        check_sizes("decoder LM", self,
                    ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers",
                     "max_length"), ("dropout_rate", "attention_dropout_rate"))
        if self.position_embedding == "rotary" and self.d_kv % 2:
            raise UserError(f"decoder LM config: rotary positions rotate pairs of dimensions, so "
                            f"d_kv={self.d_kv} must be even")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecoderLMConfig:
        return strict_from_dict(cls, "decoder LM", d)


# --------------------------------------------------------------------------- positions, masks


def rotary_angles(positions: jax.Array, d_kv: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, d_kv] (float32) for integer ``positions`` [B, T]: dims i and
    i + d_kv/2 form a pair rotated by ``position * base**(-2i / d_kv)``."""
    inv_freq = 1.0 / (base ** (np.arange(0, d_kv, 2, dtype=np.float32) / d_kv))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [B, T, N, H] by the angles of ``rotary_angles`` (rotate-half convention)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def positions_in_segments(segment_ids: jax.Array) -> jax.Array:
    """[B, L] index of each token within its run of equal segment ids (packed documents)."""
    index = jnp.arange(segment_ids.shape[1])[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def self_attention_mask(length: int, segment_ids: jax.Array | None,
                        attention_mask: jax.Array | None) -> jax.Array:
    """[B or 1, 1, L, L] bool: the given mask ([B, L, L], True = may attend) or causal, and,
    with ``segment_ids``, only keys of the query's own non-padding (> 0) segment."""
    if attention_mask is None:
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    else:
        mask = jnp.asarray(attention_mask, bool)
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.shape[-2:] != (length, length):
            raise UserError(f"attention_mask has shape {mask.shape}; expected [batch, {length}, "
                            f"{length}] for inputs of length {length}")
    if segment_ids is not None:
        same = ((segment_ids[:, :, None] == segment_ids[:, None, :])
                & (segment_ids[:, None, :] > 0))
        mask = mask & same[:, None]
    return mask


# --------------------------------------------------------------------------- the model


def _norm(c: DecoderLMConfig, rngs: nnx.Rngs) -> nnx.Module:
    kind = L.LayerNorm if c.norm == "layernorm" else L.RMSNorm
    return kind(c.d_model, eps=c.layer_norm_epsilon, dtype=L.dtype_of(c.dtype),
                param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, c: DecoderLMConfig, *, rngs: nnx.Rngs):
        dt, pdt = L.dtype_of(c.dtype), L.dtype_of(c.param_dtype)
        out_std = c.init_std / (2 * c.num_layers) ** 0.5  # GPT-2's scaled residual projections
        self.pre_attention_norm = _norm(c, rngs)
        self.attention = L.MultiHeadAttention(
            c.d_model, c.num_heads, c.d_kv, use_bias=c.use_bias, init_std=c.init_std,
            out_init_std=out_std, dropout_rate=c.attention_dropout_rate, dtype=dt,
            param_dtype=pdt, rngs=rngs)
        self.pre_mlp_norm = _norm(c, rngs)
        self.mlp = L.FeedForward(c.d_model, c.d_ff, activation=c.activation, gated=c.gated_mlp,
                                 use_bias=c.use_bias, init_std=c.init_std, out_init_std=out_std,
                                 dropout_rate=0.0, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.dropout_rate = c.dropout_rate

    def __call__(self, x, *, mask, rotary, dropout_key=None, cache=None, start=None):
        """One pre-LN layer; with ``cache`` (this layer's ``key``/``value`` [B, S, N, H]) the
        new tokens' keys/values go in at slot ``start`` and are returned too."""
        keys = L.split_key(dropout_key, 3)
        h = self.pre_attention_norm(x)
        q = self.attention.project_q(h)
        k, v = self.attention.project_kv(h)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        k, v, new_kv = L.extend_kv(cache, k, v, start, names=("key", "value"))
        y = self.attention.attend(q, k, v, mask=mask, dropout_key=keys[0])
        x = x + L.dropout(y, self.dropout_rate, keys[1])
        y = self.mlp(self.pre_mlp_norm(x))
        return x + L.dropout(y, self.dropout_rate, keys[2]), new_kv


class DecoderLM(nnx.Module):
    """Causal LM; ``__call__`` gives float32 next-token logits [B, L, vocab]."""

    def __init__(self, config: DecoderLMConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = L.dtype_of(c.param_dtype)
        self.token_embedding = L.make_param(rngs, L.normal(c.init_std), (c.vocab_size, c.d_model),
                                            ("vocab", "embed"), pdt)
        if c.position_embedding == "learned":
            self.position_embedding = L.make_param(
                rngs, L.normal(c.init_std), (c.max_length, c.d_model), (POSITION_AXIS, "embed"),
                pdt)
        self.layers = L.make_stack(lambda r: DecoderLayer(c, rngs=r), c.num_layers, rngs,
                                   scan=c.scan_layers)
        self.final_norm = _norm(c, rngs)
        if not c.tie_word_embeddings:
            self.lm_head = L.make_param(rngs, L.normal(c.init_std), (c.d_model, c.vocab_size),
                                        ("embed", "vocab"), pdt)

    # ------------------------------------------------------------------ helpers
    def _check_length(self, length: int) -> None:
        c = self.config
        if c.position_embedding == "learned" and length > c.max_length:
            raise UserError(f"sequence length {length} exceeds the decoder LM's max_length="
                            f"{c.max_length} (its learned position table); shorten the inputs")

    def _embed(self, ids: jax.Array, positions: jax.Array, key: jax.Array | None):
        """Embeddings [B, T, D] and the rotary (cos, sin) or None."""
        c = self.config
        x = jnp.take(self.token_embedding[...], ids, axis=0)
        rotary = None
        if c.position_embedding == "learned":
            x = x + jnp.take(self.position_embedding[...], positions, axis=0)
        else:
            rotary = rotary_angles(positions, c.d_kv, c.rotary_base)
        return L.dropout(x.astype(L.dtype_of(c.dtype)), c.dropout_rate, key), rotary

    def _run(self, x, per_layer, body):
        return L.run_stack(self.layers, x, per_layer, body, scan=self.config.scan_layers,
                           remat_policy=self.config.remat_policy, unroll=self.config.scan_unroll)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits from final hidden states (tied: h @ E^T, no scaling, as GPT-2)."""
        dt = L.dtype_of(self.config.dtype)
        if self.config.tie_word_embeddings:
            logits = L.dense(hidden, self.token_embedding[...].astype(dt),
                             kernel_transposed=True, preferred_element_type=jnp.float32)
        else:
            logits = L.dense(hidden, self.lm_head[...].astype(dt),
                             preferred_element_type=jnp.float32)
        return constrain(logits, LOGITS)

    # ------------------------------------------------------------------ public API
    def hidden(self, ids: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
               enable_dropout: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Final (normed) hidden states [B, L, d_model] in the compute dtype.

        ``segment_ids`` [B, L]: packed documents (0 = padding); a token attends within its
        document only and positions restart at each document. ``positions`` [B, L] override
        them (e.g. left padding). ``attention_mask`` [B, L, L] (True = may attend) replaces
        the causal mask (prefix LM, UniLM); segments still apply.
        """
        c = self.config
        length = ids.shape[1]
        self._check_length(length)
        if positions is None:
            positions = (positions_in_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(length), ids.shape))
        mask = self_attention_mask(length, segment_ids, attention_mask)
        k_embed, k_layers = L.dropout_keys(c.dropout_rate > 0 or c.attention_dropout_rate > 0,
                                           enable_dropout, rngs, 2)
        x, rotary = self._embed(ids, positions, k_embed)
        x = constrain(x, HIDDEN)  # batch-first over data and fsdp inside a sharded step

        def body(layer, x, key):
            return constrain(layer(x, mask=mask, rotary=rotary, dropout_key=key)[0], HIDDEN), None

        x, _ = self._run(x, L.layer_keys(k_layers, c.num_layers), body)
        return constrain(self.final_norm(x), HIDDEN)

    def __call__(self, ids: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 enable_dropout: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Float32 logits [B, L, vocab]; arguments as ``hidden``."""
        return self.logits(self.hidden(ids, segment_ids=segment_ids, positions=positions,
                                       attention_mask=attention_mask,
                                       enable_dropout=enable_dropout, rngs=rngs))

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self, batch_size: int, max_decode_length: int) -> dict[str, jax.Array]:
        """Zeroed KV cache: ``key``/``value`` [layers, B, max_len, heads, d_kv]; ``valid``
        [B, max_len] marks slots holding real tokens; ``offset`` [B] = slot - position."""
        c = self.config
        self._check_length(max_decode_length)
        shape = (c.num_layers, batch_size, max_decode_length, c.num_heads, c.d_kv)
        dt = L.dtype_of(c.dtype)
        return {"key": jnp.zeros(shape, dt), "value": jnp.zeros(shape, dt),
                "valid": jnp.zeros((batch_size, max_decode_length), bool),
                "offset": jnp.zeros((batch_size,), jnp.int32)}

    def prefill(self, ids: jax.Array, cache: dict[str, jax.Array], *,
                valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [B, T, vocab] for a prompt in cache slots 0..T-1, and the filled cache.

        ``valid`` [B, T] marks real tokens; padding (left or right) is never attended and
        positions count real tokens only, so generation continues at slot T for every row.
        """
        length = ids.shape[1]
        valid = jnp.ones(ids.shape, bool) if valid is None else jnp.asarray(valid, bool)
        counts = jnp.cumsum(valid.astype(jnp.int32), axis=1)
        positions = jnp.maximum(counts - 1, 0)
        cache = {**cache, "offset": (length - counts[:, -1]).astype(jnp.int32)}
        hidden, cache = self.extend(ids, cache, 0, valid=valid, positions=positions)
        return self.logits(hidden), cache

    def decode_step(self, token_ids: jax.Array, cache: dict[str, jax.Array],
                    position: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [B, vocab] (float32) for ``token_ids`` [B] written at slot ``position``, and
        the new cache. Equal to the full forward's logits at that token."""
        positions = (position - cache["offset"])[:, None]
        hidden, cache = self.extend(token_ids[:, None], cache, position,
                                    valid=jnp.ones((token_ids.shape[0], 1), bool),
                                    positions=positions)
        return self.logits(hidden)[:, 0], cache

    def extend(self, ids: jax.Array, cache: dict[str, jax.Array], start: jax.Array | int, *,
               valid: jax.Array, positions: jax.Array,
               attention_mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Final (normed) hidden states [B, T, d_model] of ``ids`` [B, T] written into cache
        slots ``start``..``start + T - 1``, and the cache holding their keys and values.

        The step under ``prefill`` and ``decode_step``, public for decoders that change the
        mask (UniLM's seq2seq source sees itself bidirectionally). ``valid`` [B, T] marks real
        tokens (slots never marked valid are never attended); ``positions`` [B, T] are their
        positions. ``attention_mask`` [B, T, slots] (True = may attend) replaces the causal
        rule that a token sees the slots up to its own. ``logits`` turns the result into
        next-token logits.
        """
        slots = cache["key"].shape[2]
        key_valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.asarray(valid, bool),
                                                 (0, start))
        if attention_mask is None:
            query_slots = start + jnp.arange(ids.shape[1])
            allowed = jnp.arange(slots)[None, None, :] <= query_slots[None, :, None]
        else:
            allowed = jnp.asarray(attention_mask, bool)
            if allowed.shape[-2:] != (ids.shape[1], slots):
                raise UserError(f"attention_mask has shape {allowed.shape}; expected [batch, "
                                f"{ids.shape[1]}, {slots}] for {ids.shape[1]} tokens and a "
                                f"cache of {slots} slots")
        mask = (key_valid[:, None, :] & allowed)[:, None]
        x, rotary = self._embed(ids, positions, None)

        def body(layer, x, layer_cache):
            return layer(x, mask=mask, rotary=rotary, cache=layer_cache, start=start)

        y, (k, v) = self._run(x, {"key": cache["key"], "value": cache["value"]}, body)
        new_cache = {**L.write_kv(cache, k, v, start, names=("key", "value")), "valid": key_valid}
        return self.final_norm(y), new_cache
