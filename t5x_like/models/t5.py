"""T5 (v1.1 by default, v1.0 by config) as a Flax NNX encoder-decoder.

Pre-norm RMSNorm layers, relative position buckets computed once per stack, unscaled attention
(the 1/sqrt(d_kv) lives in the query init), gated-GELU or ReLU feed-forward, tied or untied
output head. Token 0 is padding and the decoder start token; the caller shifts targets right.
Numerically equal to ``transformers.T5ForConditionalGeneration`` (tests/test_t5_model.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.models import layers as L
from t5x_like.models.activation_sharding import constrain
from t5x_like.models.config_checks import check_choices, check_scan_unroll, strict_from_dict

FEED_FORWARD_PROJ = ("gated-gelu", "relu")
# Layers a trip of the scanned stacks on a one-device CPU step, when scan_unroll is 0. Two halve
# the trips and let XLA fuse across a layer boundary: the scanned T5 bench step (remat "dots")
# took 0.978x and 0.986x the time of one layer a trip (6 and 5 interleaved rounds in one
# process, 2026-12-05, RESULTS.md), and 0.956-0.991x a round with the rematerialised layers'
# row-major weight gradients (cpu_matmul). A sharded step keeps one: with two, XLA all-reduces the
# gradient of the shared position bias inside the loop, every trip, where with one it sums the
# trips' partial gradients and all-reduces once after it (T5 large as fsdp 8 on v5p:2x2x2: 1.21
# against 0.80 GB of all-reduce per chip a step), and the TPU compile took 1.3x as long. (BERT
# mini, remat "none", was 1.09x slower with two: the other families keep one.)
T5_CPU_SCAN_UNROLL = 2
# Activation layouts by logical axis (activation_sharding): the batch over data and fsdp.
HIDDEN = ("batch", "length", None)
LOGITS = ("batch", "length", "vocab")


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # embedding rows (the vocabulary padded to a multiple of 128)
    d_model: int = 512
    d_kv: int = 64
    num_heads: int = 6
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1; "relu" = T5 v1.0
    tie_word_embeddings: bool = False  # tied: logits = (y * d_model**-0.5) @ E^T, as HF
    dtype: str = "float32"  # compute dtype; params stay param_dtype, logits float32
    param_dtype: str = "float32"
    scan_layers: bool = True  # stack layers with nnx.vmap, apply with nnx.scan
    remat_policy: str = "none"  # "none" | "minimal" | "dots" | "full" (layers.REMAT_POLICIES)
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: T5_CPU_SCAN_UNROLL or 1
    attention_implementation: str = "auto"  # "auto" | "xla" | "cudnn" (fused, GPU, bf16)

    def __post_init__(self):
        check_choices("T5", self, {
            "feed_forward_proj": FEED_FORWARD_PROJ,
            "dtype": tuple(L.DTYPES),
            "param_dtype": tuple(L.DTYPES),
            "remat_policy": tuple(L.REMAT_POLICIES),
            "attention_implementation": tuple(L.ATTENTION_IMPLEMENTATIONS),
        })
        check_scan_unroll("T5", self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T5Config:
        return strict_from_dict(cls, "T5", d)


def _mlp(c: T5Config, rngs: nnx.Rngs) -> L.FeedForward:
    """Gated-GELU (v1.1: gelu_tanh(x W0) * x W1) or ReLU (v1.0), then Wo; no biases."""
    gated = c.feed_forward_proj == "gated-gelu"
    return L.FeedForward(c.d_model, c.d_ff, activation="gelu_new" if gated else "relu",
                         gated=gated, use_bias=False, init_std=c.d_model**-0.5,
                         out_init_std=c.d_ff**-0.5, dropout_rate=c.dropout_rate,
                         dtype=L.dtype_of(c.dtype), param_dtype=L.dtype_of(c.param_dtype),
                         rngs=rngs)


class EncoderLayer(nnx.Module):
    def __init__(self, c: T5Config, *, rngs: nnx.Rngs):
        dt, pdt = L.dtype_of(c.dtype), L.dtype_of(c.param_dtype)
        norm = dict(eps=c.layer_norm_epsilon, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.pre_attention_norm = L.RMSNorm(c.d_model, **norm)
        self.attention = L.Attention(
            c.d_model, c.num_heads, c.d_kv, dropout_rate=c.dropout_rate, dtype=dt,
            param_dtype=pdt, rngs=rngs,
            implementation=L.ATTENTION_IMPLEMENTATIONS[c.attention_implementation])
        self.pre_mlp_norm = L.RMSNorm(c.d_model, **norm)
        self.mlp = _mlp(c, rngs)
        self.dropout_rate = c.dropout_rate

    def __call__(self, x, *, bias, mask, dropout_key=None):
        keys = L.split_key(dropout_key, 4)
        h = self.pre_attention_norm(x)
        k, v = self.attention.project_kv(h)
        y = self.attention(h, k, v, bias=bias, mask=mask, dropout_key=keys[0])
        x = x + L.dropout(y, self.dropout_rate, keys[1])
        y = self.mlp(self.pre_mlp_norm(x), keys[2])
        return x + L.dropout(y, self.dropout_rate, keys[3])


class DecoderLayer(nnx.Module):
    def __init__(self, c: T5Config, *, rngs: nnx.Rngs):
        dt, pdt = L.dtype_of(c.dtype), L.dtype_of(c.param_dtype)
        norm = dict(eps=c.layer_norm_epsilon, dtype=dt, param_dtype=pdt, rngs=rngs)
        attn = dict(dropout_rate=c.dropout_rate, dtype=dt, param_dtype=pdt, rngs=rngs,
                    implementation=L.ATTENTION_IMPLEMENTATIONS[c.attention_implementation])
        self.pre_self_attention_norm = L.RMSNorm(c.d_model, **norm)
        self.self_attention = L.Attention(c.d_model, c.num_heads, c.d_kv, **attn)
        self.pre_cross_attention_norm = L.RMSNorm(c.d_model, **norm)
        self.cross_attention = L.Attention(c.d_model, c.num_heads, c.d_kv, **attn)
        self.pre_mlp_norm = L.RMSNorm(c.d_model, **norm)
        self.mlp = _mlp(c, rngs)
        self.dropout_rate = c.dropout_rate

    def __call__(self, x, encoded, *, self_bias, self_mask, cross_mask, dropout_key=None,
                 cache=None, position=None):
        """One decoder layer; with ``cache`` (one token), returns the token's new (k, v) too.

        ``cache`` holds this layer's ``self_key``/``self_value`` [B, S, N, H] and, when
        precomputed, ``cross_key``/``cross_value`` (else they are projected from ``encoded``).
        """
        keys = L.split_key(dropout_key, 6)
        h = self.pre_self_attention_norm(x)
        k, v, new_kv = L.extend_kv(cache, *self.self_attention.project_kv(h), position)
        y = self.self_attention(h, k, v, bias=self_bias, mask=self_mask, dropout_key=keys[0])
        x = x + L.dropout(y, self.dropout_rate, keys[1])

        h = self.pre_cross_attention_norm(x)
        if cache is not None and "cross_key" in cache:
            k, v = cache["cross_key"], cache["cross_value"]
        else:
            k, v = self.cross_attention.project_kv(encoded)
        y = self.cross_attention(h, k, v, bias=None, mask=cross_mask, dropout_key=keys[2])
        x = x + L.dropout(y, self.dropout_rate, keys[3])

        y = self.mlp(self.pre_mlp_norm(x), keys[4])
        return x + L.dropout(y, self.dropout_rate, keys[5]), new_kv


class Stack(nnx.Module):
    """A T5 stack: one relative position bias shared by its layers, the layers, a final norm."""

    def __init__(self, c: T5Config, make_layer, num_layers: int, *, bidirectional: bool,
                 rngs: nnx.Rngs):
        self.relpos_bias = L.RelativePositionBias(
            c.relative_attention_num_buckets, c.relative_attention_max_distance, c.num_heads,
            bidirectional=bidirectional, init_std=c.d_model**-0.5,
            param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)
        self.layers = L.make_stack(make_layer, num_layers, rngs, scan=c.scan_layers)
        self.final_norm = L.RMSNorm(c.d_model, eps=c.layer_norm_epsilon, dtype=L.dtype_of(c.dtype),
                                    param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)


def _padding_mask(encoder_input_tokens: jax.Array) -> jax.Array:
    """[B, 1, 1, L]: keys that are real tokens (id 0 is padding)."""
    return (encoder_input_tokens > 0)[:, None, None, :]


class T5(nnx.Module):
    """Encoder-decoder; ``__call__`` gives float32 logits for teacher-forced decoder inputs."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.token_embedder = L.Embed(c.vocab_size, c.d_model, dtype=L.dtype_of(c.dtype),
                                      param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)
        # Bidirectional buckets in the encoder, causal (past-only) buckets in the decoder.
        self.encoder = Stack(c, lambda r: EncoderLayer(c, rngs=r), c.num_encoder_layers,
                             bidirectional=True, rngs=rngs)
        self.decoder = Stack(c, lambda r: DecoderLayer(c, rngs=r), c.num_decoder_layers,
                             bidirectional=False, rngs=rngs)
        if not c.tie_word_embeddings:
            # std 1/sqrt(d_model) keeps initial logits O(1); std 1.0 starts the loss near 66.
            self.lm_head = L.make_param(rngs, L.normal(c.d_model**-0.5), (c.d_model, c.vocab_size),
                                        ("embed", "vocab"), L.dtype_of(c.param_dtype))

    # ------------------------------------------------------------------ helpers
    def _dropout_keys(self, enable_dropout: bool, rngs: nnx.Rngs | None, n: int) -> list:
        return L.dropout_keys(self.config.dropout_rate != 0.0, enable_dropout, rngs, n)

    def _run(self, layers, x, per_layer, body):
        return L.run_stack(layers, x, per_layer, body, scan=self.config.scan_layers,
                           remat_policy=self.config.remat_policy, unroll=self.config.scan_unroll,
                           cpu_unroll=T5_CPU_SCAN_UNROLL)

    def _logits(self, y: jax.Array) -> jax.Array:
        c = self.config
        if c.tie_word_embeddings:
            return constrain(self.token_embedder.attend(y * c.d_model**-0.5), LOGITS)
        kernel = self.lm_head[...].astype(L.dtype_of(c.dtype))
        return constrain(L.dense(y, kernel, preferred_element_type=jnp.float32), LOGITS)

    # ------------------------------------------------------------------ public API
    def encode(self, encoder_input_tokens: jax.Array, *, enable_dropout: bool = False,
               rngs: nnx.Rngs | None = None,
               encoder_segment_ids: jax.Array | None = None) -> jax.Array:
        """Encoder outputs [B, L, d_model] in the compute dtype.

        Packed rows (several examples a row, as seqio's ``pack=True``) pass
        ``encoder_segment_ids`` [B, L] (1, 2, ... per example, 0 padding): a token attends only
        within its example. The relative position buckets need no per-example positions: an
        example's tokens are contiguous, so key index - query index is the distance within it.
        """
        c = self.config
        k_embed, k_layers, k_final = self._dropout_keys(enable_dropout, rngs, 3)
        length = encoder_input_tokens.shape[1]
        bias = self.encoder.relpos_bias(length, length)  # once per stack, shared by all layers
        if encoder_segment_ids is None:
            mask = _padding_mask(encoder_input_tokens)
        else:
            mask = L.segment_mask(encoder_segment_ids, encoder_segment_ids)
        x = L.dropout(self.token_embedder(encoder_input_tokens), c.dropout_rate, k_embed)
        x = constrain(x, HIDDEN)

        def body(layer, x, key):
            return constrain(layer(x, bias=bias, mask=mask, dropout_key=key), HIDDEN), None

        x, _ = self._run(self.encoder.layers, x, L.layer_keys(k_layers, c.num_encoder_layers), body)
        return constrain(L.dropout(self.encoder.final_norm(x), c.dropout_rate, k_final), HIDDEN)

    def decode(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
               decoder_input_tokens: jax.Array, *, enable_dropout: bool = False,
               rngs: nnx.Rngs | None = None, encoder_segment_ids: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, vocab] for teacher-forced (shifted-right) decoder inputs.

        Packed rows pass both segment ids: self- and cross-attention stay within an example.
        """
        c = self.config
        k_embed, k_layers, k_final = self._dropout_keys(enable_dropout, rngs, 3)
        length = decoder_input_tokens.shape[1]
        self_bias = self.decoder.relpos_bias(length, length)
        if decoder_segment_ids is None:
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            cross_mask = _padding_mask(encoder_input_tokens)
        else:
            causal = L.segment_mask(decoder_segment_ids, decoder_segment_ids, causal=True)
            cross_mask = L.segment_mask(decoder_segment_ids, encoder_segment_ids)
        y = constrain(L.dropout(self.token_embedder(decoder_input_tokens), c.dropout_rate,
                                k_embed), HIDDEN)

        def body(layer, y, key):
            y, _ = layer(y, encoded, self_bias=self_bias, self_mask=causal, cross_mask=cross_mask,
                         dropout_key=key)
            return constrain(y, HIDDEN), None

        y, _ = self._run(self.decoder.layers, y, L.layer_keys(k_layers, c.num_decoder_layers), body)
        return self._logits(L.dropout(self.decoder.final_norm(y), c.dropout_rate, k_final))

    def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array, *,
                 enable_dropout: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        # Each rngs.dropout() call yields a fresh key, so encoder and decoder masks differ.
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout, rngs=rngs)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           enable_dropout=enable_dropout, rngs=rngs)

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self, batch_size: int, max_decode_length: int,
                   encoded: jax.Array | None = None) -> dict[str, jax.Array]:
        """Zeroed self-attention KV cache [layers, B, max_len, heads, d_kv] per key/value.

        With ``encoded``, also the cross-attention keys/values [layers, B, L, heads, d_kv], so
        ``decode_step`` does not re-project the encoder output at every step.
        """
        c = self.config
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
        self_bias = self.decoder.relpos_bias.at_position(position, max_length)
        self_mask = (jnp.arange(max_length) <= position)[None, None, None, :]
        cross_mask = _padding_mask(encoder_input_tokens)
        y = self.token_embedder(token_ids[:, None])

        def body(layer, y, layer_cache):
            return layer(y, encoded, self_bias=self_bias, self_mask=self_mask,
                         cross_mask=cross_mask, cache=layer_cache, position=position)

        y, (k, v) = self._run(self.decoder.layers, y, cache, body)
        return self._logits(self.decoder.final_norm(y))[:, 0], L.write_kv(cache, k, v, position)
