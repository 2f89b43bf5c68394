"""BART as a Flax NNX encoder-decoder.

Post-LN layers (residual, then LayerNorm), attention and feed-forward with biases, GELU (exact),
learned positions read at ``position + 2`` (BART's offset), a LayerNorm on the embeddings of
each stack, token embeddings optionally scaled by sqrt(d_model), tied output embeddings plus a
``final_logits_bias``. Padding is ``pad_token_id`` in the encoder input; the caller shifts
targets right starting from ``decoder_start_token_id``. Numerically equal to
``transformers.BartForConditionalGeneration`` (tests/test_bart_model.py).
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
from t5x_like.models.config_checks import (
    check_choices,
    check_scan_unroll,
    check_sizes,
    strict_from_dict,
)
from t5x_like.models.decoder_lm import POSITION_AXIS

POSITION_OFFSET = 2  # BART's learned position table has 2 extra rows; position p reads p + 2


@dataclasses.dataclass(frozen=True)
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 768
    num_heads: int = 12  # d_kv = d_model // num_heads
    d_ff: int = 3072
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_position_embeddings: int = 1024  # longest encoder / decoder sequence
    activation: str = "gelu"
    scale_embedding: bool = False  # token embeddings * sqrt(d_model)
    layer_norm_epsilon: float = 1e-5
    dropout_rate: float = 0.1  # embeddings and residual branches
    attention_dropout_rate: float = 0.0
    activation_dropout_rate: float = 0.0  # inside the feed-forward
    init_std: float = 0.02
    pad_token_id: int = 1  # encoder keys with this id are masked out
    decoder_start_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    def __post_init__(self):
        check_scan_unroll("BART", self)
        check_choices("BART", self, {
            "activation": tuple(L.ACTIVATIONS), "dtype": tuple(L.DTYPES),
            "param_dtype": tuple(L.DTYPES), "remat_policy": tuple(L.REMAT_POLICIES)})
        check_sizes("BART", self, ("vocab_size", "d_model", "num_heads", "d_ff",
                                   "num_encoder_layers", "num_decoder_layers",
                                   "max_position_embeddings"),
                    ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate"))
        if self.d_model % self.num_heads:
            raise UserError(f"BART config: d_model={self.d_model} is not divisible by "
                            f"num_heads={self.num_heads}")

    @property
    def d_kv(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BartConfig:
        return strict_from_dict(cls, "BART", d)


def _blocks(c: BartConfig, rngs: nnx.Rngs) -> dict:
    dt, pdt = L.dtype_of(c.dtype), L.dtype_of(c.param_dtype)
    return {
        "attention": lambda: L.MultiHeadAttention(
            c.d_model, c.num_heads, c.d_kv, use_bias=True, init_std=c.init_std,
            out_init_std=c.init_std, dropout_rate=c.attention_dropout_rate, dtype=dt,
            param_dtype=pdt, rngs=rngs),
        "norm": lambda: L.LayerNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=dt,
                                    param_dtype=pdt, rngs=rngs),
        "mlp": lambda: L.FeedForward(
            c.d_model, c.d_ff, activation=c.activation, gated=False, use_bias=True,
            init_std=c.init_std, out_init_std=c.init_std, dropout_rate=c.activation_dropout_rate,
            dtype=dt, param_dtype=pdt, rngs=rngs),
    }


class EncoderLayer(nnx.Module):
    def __init__(self, c: BartConfig, *, rngs: nnx.Rngs):
        make = _blocks(c, rngs)
        self.self_attention = make["attention"]()
        self.self_attention_norm = make["norm"]()
        self.mlp = make["mlp"]()
        self.mlp_norm = make["norm"]()
        self.dropout_rate = c.dropout_rate

    def __call__(self, x, *, mask, dropout_key=None):
        keys = L.split_key(dropout_key, 4)
        k, v = self.self_attention.project_kv(x)
        y = self.self_attention.attend(self.self_attention.project_q(x), k, v, mask=mask,
                                       dropout_key=keys[0])
        x = self.self_attention_norm(x + L.dropout(y, self.dropout_rate, keys[1]))
        y = self.mlp(x, keys[2])
        return self.mlp_norm(x + L.dropout(y, self.dropout_rate, keys[3]))


class DecoderLayer(nnx.Module):
    def __init__(self, c: BartConfig, *, rngs: nnx.Rngs):
        make = _blocks(c, rngs)
        self.self_attention = make["attention"]()
        self.self_attention_norm = make["norm"]()
        self.cross_attention = make["attention"]()
        self.cross_attention_norm = make["norm"]()
        self.mlp = make["mlp"]()
        self.mlp_norm = make["norm"]()
        self.dropout_rate = c.dropout_rate

    def __call__(self, x, encoded, *, self_mask, cross_mask, dropout_key=None, cache=None,
                 position=None):
        """One decoder layer; with ``cache`` (one token), returns the token's new (k, v) too.

        ``cache`` holds this layer's ``self_key``/``self_value`` [B, S, N, H] and, when
        precomputed, ``cross_key``/``cross_value`` (else they are projected from ``encoded``).
        """
        keys = L.split_key(dropout_key, 6)
        k, v, new_kv = L.extend_kv(cache, *self.self_attention.project_kv(x), position)
        y = self.self_attention.attend(self.self_attention.project_q(x), k, v, mask=self_mask,
                                       dropout_key=keys[0])
        x = self.self_attention_norm(x + L.dropout(y, self.dropout_rate, keys[1]))

        if cache is not None and "cross_key" in cache:
            k, v = cache["cross_key"], cache["cross_value"]
        else:
            k, v = self.cross_attention.project_kv(encoded)
        y = self.cross_attention.attend(self.cross_attention.project_q(x), k, v, mask=cross_mask,
                                        dropout_key=keys[2])
        x = self.cross_attention_norm(x + L.dropout(y, self.dropout_rate, keys[3]))

        y = self.mlp(x, keys[4])
        return self.mlp_norm(x + L.dropout(y, self.dropout_rate, keys[5])), new_kv


class Stack(nnx.Module):
    """A BART stack: its learned positions, the embedding LayerNorm, the layers."""

    def __init__(self, c: BartConfig, make_layer, num_layers: int, *, rngs: nnx.Rngs):
        self.position_embedding = L.make_param(
            rngs, L.normal(c.init_std), (c.max_position_embeddings + POSITION_OFFSET, c.d_model),
            (POSITION_AXIS, "embed"), L.dtype_of(c.param_dtype))
        self.embedding_norm = _blocks(c, rngs)["norm"]()
        self.layers = L.make_stack(make_layer, num_layers, rngs, scan=c.scan_layers)


class Bart(nnx.Module):
    """Encoder-decoder; ``__call__`` gives float32 logits for teacher-forced decoder inputs."""

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.token_embedding = L.make_param(rngs, L.normal(c.init_std), (c.vocab_size, c.d_model),
                                            ("vocab", "embed"), L.dtype_of(c.param_dtype))
        self.encoder = Stack(c, lambda r: EncoderLayer(c, rngs=r), c.num_encoder_layers,
                             rngs=rngs)
        self.decoder = Stack(c, lambda r: DecoderLayer(c, rngs=r), c.num_decoder_layers,
                             rngs=rngs)
        # A learned output bias (transformers keeps it as a zero buffer; trained here).
        self.final_logits_bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,),
                                              ("vocab",), L.dtype_of(c.param_dtype))

    # ------------------------------------------------------------------ helpers
    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.max_position_embeddings:
            raise UserError(f"BART {what} length {length} exceeds max_position_embeddings="
                            f"{self.config.max_position_embeddings}; shorten the inputs")

    def _embed(self, stack: Stack, ids: jax.Array, start, key: jax.Array | None,
               positions: jax.Array | None = None) -> jax.Array:
        """Token + learned position embeddings from ``start`` on, or at ``positions`` [B, L]
        (packed rows: each example's positions restart at 0)."""
        c = self.config
        x = jnp.take(self.token_embedding[...], ids, axis=0)
        if c.scale_embedding:
            x = x * jnp.asarray(c.d_model**0.5, x.dtype)
        if positions is None:
            rows = jax.lax.dynamic_slice_in_dim(stack.position_embedding[...],
                                                start + POSITION_OFFSET, ids.shape[1])[None]
        else:
            rows = jnp.take(stack.position_embedding[...], positions + POSITION_OFFSET, axis=0)
        x = stack.embedding_norm((x + rows).astype(L.dtype_of(c.dtype)))
        return L.dropout(x, c.dropout_rate, key)

    def _padding_mask(self, encoder_input_tokens: jax.Array) -> jax.Array:
        """[B, 1, 1, L]: keys that are not padding."""
        return (encoder_input_tokens != self.config.pad_token_id)[:, None, None, :]

    def _run(self, layers, x, per_layer, body):
        return L.run_stack(layers, x, per_layer, body, scan=self.config.scan_layers,
                           remat_policy=self.config.remat_policy, unroll=self.config.scan_unroll)

    def _logits(self, y: jax.Array) -> jax.Array:
        table = self.token_embedding[...].astype(L.dtype_of(self.config.dtype))
        logits = L.dense(y, table, kernel_transposed=True, preferred_element_type=jnp.float32)
        return logits + self.final_logits_bias[...].astype(jnp.float32)

    def _dropout_keys(self, enable_dropout: bool, rngs: nnx.Rngs | None, n: int) -> list:
        c = self.config
        used = max(c.dropout_rate, c.attention_dropout_rate, c.activation_dropout_rate) > 0
        return L.dropout_keys(used, enable_dropout, rngs, n)

    # ------------------------------------------------------------------ public API
    def encode(self, encoder_input_tokens: jax.Array, *, enable_dropout: bool = False,
               rngs: nnx.Rngs | None = None, encoder_segment_ids: jax.Array | None = None,
               encoder_positions: jax.Array | None = None) -> jax.Array:
        """Encoder outputs [B, L, d_model] in the compute dtype.

        Packed rows pass ``encoder_segment_ids`` (1, 2, ... per example, 0 padding) and
        ``encoder_positions`` (restarting at 0 per example): attention stays in the example.
        """
        c = self.config
        self._check_length(encoder_input_tokens.shape[1], "encoder input")
        k_embed, k_layers = self._dropout_keys(enable_dropout, rngs, 2)
        if encoder_segment_ids is None:
            mask = self._padding_mask(encoder_input_tokens)
        else:
            mask = L.segment_mask(encoder_segment_ids, encoder_segment_ids)
        x = self._embed(self.encoder, encoder_input_tokens, 0, k_embed, encoder_positions)

        def body(layer, x, key):
            return layer(x, mask=mask, dropout_key=key), None

        return self._run(self.encoder.layers, x, L.layer_keys(k_layers, c.num_encoder_layers),
                         body)[0]

    def decode(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
               decoder_input_tokens: jax.Array, *, enable_dropout: bool = False,
               rngs: nnx.Rngs | None = None, encoder_segment_ids: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None,
               decoder_positions: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, vocab] for teacher-forced (shifted-right) decoder inputs
        (packed rows: with both segment ids and the decoder positions, as ``encode``)."""
        c = self.config
        length = decoder_input_tokens.shape[1]
        self._check_length(length, "decoder input")
        k_embed, k_layers = self._dropout_keys(enable_dropout, rngs, 2)
        if decoder_segment_ids is None:
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            cross_mask = self._padding_mask(encoder_input_tokens)
        else:
            causal = L.segment_mask(decoder_segment_ids, decoder_segment_ids, causal=True)
            cross_mask = L.segment_mask(decoder_segment_ids, encoder_segment_ids)
        y = self._embed(self.decoder, decoder_input_tokens, 0, k_embed, decoder_positions)

        def body(layer, y, key):
            return layer(y, encoded, self_mask=causal, cross_mask=cross_mask,
                         dropout_key=key)[0], None

        y, _ = self._run(self.decoder.layers, y, L.layer_keys(k_layers, c.num_decoder_layers),
                         body)
        return self._logits(y)

    def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array, *,
                 enable_dropout: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout, rngs=rngs)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           enable_dropout=enable_dropout, rngs=rngs)

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self, batch_size: int, max_decode_length: int,
                   encoded: jax.Array | None = None) -> dict[str, jax.Array]:
        """Zeroed self-attention KV cache [layers, B, max_len, heads, d_kv] per key/value;
        with ``encoded``, also the cross-attention keys/values [layers, B, L, heads, d_kv]."""
        c = self.config
        self._check_length(max_decode_length, "decoding")
        shape = (c.num_decoder_layers, batch_size, max_decode_length, c.num_heads, c.d_kv)
        return L.encoder_decoder_cache(self.decoder.layers, shape, L.dtype_of(c.dtype), encoded,
                                       scan=c.scan_layers, remat_policy=c.remat_policy)

    def decode_step(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
                    token_ids: jax.Array, cache: dict[str, jax.Array],
                    position: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [B, vocab] (float32) for ``token_ids`` [B] at ``position``, and the new cache.

        Equal to ``decode(...)[:, position]`` when the cache holds positions < ``position``.
        """
        max_length = cache["self_key"].shape[2]
        self_mask = (jnp.arange(max_length) <= position)[None, None, None, :]
        cross_mask = self._padding_mask(encoder_input_tokens)
        y = self._embed(self.decoder, token_ids[:, None], position, None)

        def body(layer, y, layer_cache):
            return layer(y, encoded, self_mask=self_mask, cross_mask=cross_mask,
                         cache=layer_cache, position=position)

        y, (k, v) = self._run(self.decoder.layers, y, cache, body)
        return self._logits(y)[:, 0], L.write_kv(cache, k, v, position)
