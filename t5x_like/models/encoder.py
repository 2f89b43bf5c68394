"""The BERT family as one Flax NNX encoder: BERT, RoBERTa, ALBERT, ELECTRA and SpanBERT by config.

Post-LN Transformer layers (attention -> add -> LayerNorm, FFN -> add -> LayerNorm) with biases,
softmax scale 1/sqrt(head size), GELU (exact erf, or tanh for ALBERT's ``gelu_new``); learned
absolute positions (RoBERTa's start at ``position_offset``), token types, embedding LayerNorm.
ALBERT: factorised embeddings (``embedding_size`` E != hidden H, then a dense E -> H) and
cross-layer sharing. Heads: MLM (tied decoder), NSP/SOP (pooler + 2-way classifier), ELECTRA's
discriminator, SpanBERT's span-boundary objective. ``ElectraPair`` is a generator and a
discriminator sharing one embeddings module. Numerically equal to transformers' BERT, RoBERTa,
ALBERT and ELECTRA models (tests/test_encoder_model.py).

Layer sharing: the N layers are ``units`` distinct parameter sets, each applied ``N // units``
times in a row (ALBERT's ``num_hidden_groups``): ``none`` = N units, ``all`` = 1, ``groups`` =
``num_layer_groups``. ``attention``/``ffn`` share only that sub-layer: one ``shared`` copy plus N
units holding the other sub-layer.

Compression hooks (set by ``t5x_like.compress``, arithmetic in ``models/int8.py``):
``quantize='fake'`` fake-quantizes every dense and embedding weight and every dense input to
8 bits (Q8BERT; activation ranges are ``input_range`` parameters that receive no gradient and
are set by ``compress.quantize.update_ranges``); ``quantize='int8'`` holds int8 weights with
their scales and multiplies in integers.
``head_mask`` [N, heads] scales each head's output (Michel et al.'s importance is its
gradient); ``layer_num_heads`` gives each layer its own head count after structured pruning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models import int8 as Q
from t5x_like.models import layers as L
from t5x_like.models.activation_sharding import HIDDEN, LOGITS, PER_TOKEN, constrain
from t5x_like.models.encoder_config import EncoderConfig, generator_config

# --------------------------------------------------------------------------- building blocks


def _scalar(rngs: nnx.Rngs) -> nnx.Param:
    """A float32 scalar parameter (a quantization range or scale), 0 until set."""
    return L.make_param(rngs, jax.nn.initializers.zeros, (), (), jnp.float32)


class Dense(nnx.Module):
    """``x @ kernel + bias`` contracting x's last ``len(in_shape)`` dims; kernel [in..., out...].

    Quantized (``c.quantize``), the input is fake-quantized with the range ``input_range`` (the
    current batch's max|x| while that is 0) and the kernel with its own max; ``int8`` holds an
    int8 kernel and ``kernel_scale`` and accumulates in int32.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_names: tuple[str, ...], out_names: tuple[str, ...], c: EncoderConfig, *,
                 rngs: nnx.Rngs):
        pdt = L.dtype_of(c.param_dtype)
        init = L.normal(c.initializer_range)
        if c.quantize == "int8":  # filled by compress.quantize.to_int8
            init, pdt = jax.nn.initializers.zeros, jnp.int8
        self.kernel = L.make_param(rngs, init, (*in_shape, *out_shape), (*in_names, *out_names),
                                   pdt)
        pdt = L.dtype_of(c.param_dtype)
        self.bias = L.make_param(rngs, jax.nn.initializers.zeros, out_shape, out_names, pdt)
        if c.quantize != "none":
            self.input_range = _scalar(rngs)
        if c.quantize == "int8":
            self.kernel_scale = _scalar(rngs)
        self.quantize = c.quantize
        self.num_in = len(in_shape)
        self.dtype = L.dtype_of(c.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...].astype(self.dtype)
        if self.quantize == "none":
            y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                              axes=self.num_in)
            return y + bias
        x = x.astype(jnp.float32)
        x_max = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
        self.absmax = nnx.Intermediate(x_max)  # read by compress.quantize.update_ranges
        x_range = Q.active_range(self.input_range[...], x_max)
        if self.quantize == "int8":
            return Q.int8_tensordot(x, x_range, self.kernel[...], self.kernel_scale[...],
                                    self.num_in).astype(self.dtype) + bias
        kernel = self.kernel[...].astype(jnp.float32)
        y = jnp.tensordot(Q.fake_quant(x, x_range), Q.fake_quant_weight(kernel),
                          axes=self.num_in)
        return y.astype(self.dtype) + bias


def _layer_norm(dim: int, c: EncoderConfig, rngs: nnx.Rngs) -> L.LayerNorm:
    """The shared scale-and-bias layer norm with this config's epsilon and dtypes."""
    return L.LayerNorm(dim, eps=c.layer_norm_eps, dtype=L.dtype_of(c.dtype),
                       param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)


TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


class Embeddings(nnx.Module):
    """Word + position + token-type tables (E wide), summed and LayerNormed.

    Quantized, each table is fake-quantized with its own max (``int8``: int8 tables and a
    ``<table>_scale`` each, dequantized after the lookup).
    """

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        pdt, init, e = L.dtype_of(c.param_dtype), L.normal(c.initializer_range), c.table_size
        if c.quantize == "int8":  # filled by compress.quantize.to_int8
            init, pdt = jax.nn.initializers.zeros, jnp.int8
        self.word_embeddings = L.make_param(rngs, init, (c.vocab_size, e), ("vocab", "embed"), pdt)
        self.position_embeddings = L.make_param(rngs, init, (c.max_position_embeddings, e),
                                                ("position", "embed"), pdt)
        if c.type_vocab_size:
            self.token_type_embeddings = L.make_param(rngs, init, (c.type_vocab_size, e),
                                                      ("type", "embed"), pdt)
        if c.quantize == "int8":
            for name in TABLES:
                if hasattr(self, name):
                    setattr(self, f"{name}_scale", _scalar(rngs))
        self.norm = _layer_norm(e, c, rngs)
        self.position_offset = c.position_offset
        self.quantize = c.quantize
        self.dtype = L.dtype_of(c.dtype)

    def table(self, name: str) -> jax.Array:
        """A table as the model sees it: as stored, fake-quantized or dequantized."""
        w = getattr(self, name)[...]
        if self.quantize == "fake":
            return Q.fake_quant_weight(w.astype(jnp.float32))
        if self.quantize == "int8":
            return Q.dequantize(w, getattr(self, f"{name}_scale")[...])
        return w

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        """Embedded [B, L] ids; ``positions`` [B, L] (packed rows: from 0 in each example)
        replace 0..L-1."""
        length = input_ids.shape[1]
        table_rows = self.position_embeddings.shape[0]
        if length + self.position_offset > table_rows:
            raise UserError(f"sequence length {length} needs {length + self.position_offset} "
                            f"position embeddings but the model has {table_rows}; shorten "
                            "data.inputs_length or raise max_position_embeddings")
        x = jnp.take(self.table("word_embeddings"), input_ids, axis=0).astype(jnp.float32)
        # RoBERTa numbers real tokens from padding_idx + 1; with right padding that is arange.
        table = self.table("position_embeddings")
        if positions is None:
            rows = table[self.position_offset:self.position_offset + length][None]
        else:
            rows = jnp.take(table, positions + self.position_offset, axis=0)
        x = x + rows.astype(jnp.float32)
        if hasattr(self, "token_type_embeddings"):
            x = x + jnp.take(self.table("token_type_embeddings"), token_type_ids,
                             axis=0).astype(jnp.float32)
        return self.norm(x)

    def attend(self, x: jax.Array, x_range: jax.Array | None = None) -> jax.Array:
        """Float32 logits ``x @ word_embeddings^T`` (the tied MLM decoder); quantized models
        also quantize ``x`` with ``x_range``."""
        if self.quantize == "int8" and x_range is not None:
            return Q.int8_tensordot(x.astype(jnp.float32), x_range,
                                    self.word_embeddings[...].T,
                                    self.word_embeddings_scale[...], 1)
        if self.quantize == "fake" and x_range is not None:
            x = Q.fake_quant(x.astype(jnp.float32), x_range)
        table = self.table("word_embeddings").astype(x.dtype)
        return L.dense(x, table, kernel_transposed=True, preferred_element_type=jnp.float32)


class SelfAttention(nnx.Module):
    """Biased q/k/v/out projections, scaled dot-product attention, then LN(x + attention).

    ``num_heads`` may be below the config's (heads removed by pruning; the head size stays
    ``hidden_size // config.num_heads``), even 0: then only the output bias is added.
    """

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs, num_heads: int | None = None):
        h, d = c.hidden_size, c.head_dim
        n = c.num_heads if num_heads is None else num_heads
        heads = ((h,), (n, d), ("embed",), ("heads", "kv"))
        self.query = Dense(*heads, c, rngs=rngs)
        self.key = Dense(*heads, c, rngs=rngs)
        self.value = Dense(*heads, c, rngs=rngs)
        self.out = Dense((n, d), (h,), ("heads", "kv"), ("embed",), c, rngs=rngs)
        self.norm = _layer_norm(h, c, rngs)
        self.scale = d ** -0.5
        self.num_heads = n
        self.rates = (c.attention_dropout_rate, c.hidden_dropout_rate)

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None,
                 head_mask: jax.Array | None = None, with_probs: bool = False
                 ) -> tuple[jax.Array, jax.Array | None]:
        """(LN(x + attention), probabilities [B, heads, L, L] if ``with_probs``).
        ``head_mask`` [heads] scales each head's output before the output projection."""
        k_probs, k_out = L.split_key(key, 2)
        probs = None
        if self.num_heads == 0:
            y = jnp.zeros((*x.shape[:2], 0, self.out.kernel.shape[1]), x.dtype)
            if with_probs:
                probs = jnp.zeros((x.shape[0], 0, x.shape[1], x.shape[1]), jnp.float32)
        else:
            q = self.query(x) * jnp.asarray(self.scale, x.dtype)
            if with_probs:
                y, probs = L.attention_with_probs(q, self.key(x), self.value(x), bias=None,
                                                  mask=mask, dropout_rate=self.rates[0],
                                                  dropout_key=k_probs)
            else:
                y = L.attention(q, self.key(x), self.value(x), bias=None, mask=mask,
                                dropout_rate=self.rates[0], dropout_key=k_probs)
        if head_mask is not None:
            y = y * head_mask.astype(y.dtype)[:, None]
        return self.norm(x + L.dropout(self.out(y), self.rates[1], k_out)), probs


class FeedForward(nnx.Module):
    """LN(x + W_out act(W_in x))."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        h, i = c.hidden_size, c.intermediate_size
        self.wi = Dense((h,), (i,), ("embed",), ("mlp",), c, rngs=rngs)
        self.wo = Dense((i,), (h,), ("mlp",), ("embed",), c, rngs=rngs)
        self.norm = _layer_norm(h, c, rngs)
        self.hidden_act = c.hidden_act
        self.rate = c.hidden_dropout_rate

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        y = self.wo(L.ACTIVATIONS[self.hidden_act](self.wi(x)))
        return self.norm(x + L.dropout(y, self.rate, key))


class Layer(nnx.Module):
    """One post-LN layer, or the part of it that is not shared (see the module docstring)."""

    def __init__(self, c: EncoderConfig, *, attention: bool, ffn: bool, rngs: nnx.Rngs,
                 num_heads: int | None = None):
        if attention:
            self.attention = SelfAttention(c, rngs=rngs, num_heads=num_heads)
        if ffn:
            self.ffn = FeedForward(c, rngs=rngs)


def _apply_layer(layer: Layer, shared: Layer | None, x: jax.Array, mask: jax.Array,
                 key: jax.Array | None, head_mask: jax.Array | None, with_probs: bool
                 ) -> tuple[jax.Array, jax.Array | None]:
    k_attn, k_ffn = L.split_key(key, 2)
    attention = layer.attention if hasattr(layer, "attention") else shared.attention
    ffn = layer.ffn if hasattr(layer, "ffn") else shared.ffn
    y, probs = attention(x, mask, k_attn, head_mask, with_probs)
    return ffn(y, k_ffn), probs


class Transformer(nnx.Module):
    """Optional E -> H projection, then the N layers (distinct, shared or grouped)."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        if c.embedding_size:
            self.embedding_projection = Dense((c.embedding_size,), (c.hidden_size,), ("embed",),
                                              ("mlp",), c, rngs=rngs)
        share = c.layer_sharing
        if c.layer_num_heads:  # pruned: layers of different widths, as a list
            self.layers = nnx.List([Layer(c, attention=True, ffn=True, rngs=rngs, num_heads=n)
                                    for n in c.layer_num_heads])
        else:
            self.layers = L.make_stack(
                lambda r: Layer(c, attention=share != "attention", ffn=share != "ffn", rngs=r),
                c.units, rngs, scan=c.scan_layers)
        if share in ("attention", "ffn"):
            self.shared = Layer(c, attention=share == "attention", ffn=share == "ffn", rngs=rngs)
        self.config = c

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None,
                 output_hidden_states: bool, head_mask: jax.Array | None = None,
                 output_attentions: bool = False) -> tuple[jax.Array, dict]:
        """Final hidden states and a dict of what was asked: ``hidden_states`` (every layer's
        input and output [N + 1, B, L, H]), ``attentions`` [N, B, heads, L, L] and, when
        quantized, ``absmax`` (each dense input's max|x|, stacked like the layer params)."""
        c = self.config
        if hasattr(self, "embedding_projection"):
            x = constrain(self.embedding_projection(x), HIDDEN)
        units, repeats = c.units, c.num_layers // c.units
        shared = getattr(self, "shared", None)
        keys = None if key is None else jax.random.split(key, (units, repeats))
        if head_mask is not None:
            if c.layer_num_heads or head_mask.shape != (c.num_layers, c.num_heads):
                raise UserError(f"head_mask must be [num_layers, num_heads] = "
                                f"[{c.num_layers}, {c.num_heads}] on an unpruned encoder, got "
                                f"{head_mask.shape}")
            head_mask = head_mask.reshape(units, repeats, c.num_heads)
        def run_one(layer, x, inputs):
            k, m = inputs
            y, probs = _apply_layer(layer, shared, x, mask, k, m, output_attentions)
            y = constrain(y, HIDDEN)  # each layer's residual stream, batch-first
            extras = {"absmax": nnx.to_pure_dict(nnx.pop(layer, nnx.Intermediate))}
            if output_hidden_states:
                extras["hidden"] = y
            if output_attentions:  # removed heads' maps are zeros, so every layer stacks
                pad = c.num_heads - probs.shape[1]
                extras["attentions"] = jnp.pad(probs, ((0, 0), (0, pad), (0, 0), (0, 0)))
            return y, extras

        def body(layer, x, per_unit):
            def at(i):
                return jax.tree.map(lambda a: a[i], per_unit)

            if repeats == 1:
                y, out = run_one(layer, x, at(0))
                return y, jax.tree.map(lambda a: a[None], out)
            # A shared layer runs `repeats` times; remat each run, not the whole unit.
            step = L.rematerialise(lambda x, inputs: run_one(layer, x, inputs), c.remat_policy,
                                   prevent_cse=not c.scan_layers)
            if c.scan_layers:
                return jax.lax.scan(step, x, per_unit, length=repeats)
            outs = []
            for i in range(repeats):
                x, out = step(x, at(i))
                outs.append(out)
            return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

        x_final, outs = L.run_stack(self.layers, x, (keys, head_mask), body,
                                    scan=c.scan_layers, unroll=c.scan_unroll,
                                    remat_policy=c.remat_policy if repeats == 1 else "none")
        extras = {}
        if output_hidden_states:
            hidden = outs["hidden"].reshape(c.num_layers, *outs["hidden"].shape[2:])
            extras["hidden_states"] = jnp.concatenate([x[None], hidden])
        if output_attentions:
            extras["attentions"] = outs["attentions"].reshape(c.num_layers,
                                                              *outs["attentions"].shape[2:])
        if c.quantize != "none":
            # [units, repeats] -> the max over a shared unit's runs, laid out like its params
            absmax = jax.tree.map(lambda a: a.max(axis=1), outs["absmax"])
            if not c.scan_layers:
                absmax = {i: jax.tree.map(lambda a, i=i: a[i], absmax) for i in range(units)}
            extras["absmax"] = {"layers": absmax}
        return x_final, extras


# --------------------------------------------------------------------------- heads


class MLMHead(nnx.Module):
    """dense H -> E, activation, LayerNorm, tied decoder (word embeddings^T) + bias."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        e = c.table_size
        self.transform = Dense((c.hidden_size,), (e,), ("mlp",), ("embed",), c, rngs=rngs)
        self.norm = _layer_norm(e, c, rngs)
        self.bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,), ("vocab",),
                                 L.dtype_of(c.param_dtype))
        if c.quantize != "none":  # the tied decoder's input range
            self.decoder_range = _scalar(rngs)
        self.hidden_act = c.hidden_act

    def __call__(self, x: jax.Array, embeddings: Embeddings) -> jax.Array:
        h = self.norm(L.ACTIVATIONS[self.hidden_act](self.transform(x)))
        h_range = None
        if hasattr(self, "decoder_range"):
            h_max = jax.lax.stop_gradient(jnp.max(jnp.abs(h.astype(jnp.float32))))
            self.decoder_absmax = nnx.Intermediate(h_max)
            h_range = Q.active_range(self.decoder_range[...], h_max)
        return embeddings.attend(h, h_range) + self.bias[...].astype(jnp.float32)


class DiscriminatorHead(nnx.Module):
    """ELECTRA: dense H -> H, activation, dense H -> 1: a replaced-token logit per position."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        h = c.hidden_size
        self.dense = Dense((h,), (h,), ("embed",), ("mlp",), c, rngs=rngs)
        self.prediction = Dense((h,), (), ("mlp",), (), c, rngs=rngs)
        self.hidden_act = c.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.prediction(L.ACTIVATIONS[self.hidden_act](self.dense(x))).astype(jnp.float32)


class SpanBoundaryHead(nnx.Module):
    """SpanBERT's SBO: [x_{s-1}; x_{e+1}; p_i] -> 2 x (dense, GELU, LayerNorm) -> tied decoder."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        h, e = c.hidden_size, c.table_size
        self.position_embeddings = L.make_param(
            rngs, L.normal(c.initializer_range), (c.sbo_max_span_length, h), ("position", "embed"),
            L.dtype_of(c.param_dtype))
        self.dense1 = Dense((3, h), (h,), ("span_parts", "embed"), ("mlp",), c,
                            rngs=rngs)
        self.norm1 = _layer_norm(h, c, rngs)
        self.dense2 = Dense((h,), (e,), ("mlp",), ("embed",), c, rngs=rngs)
        self.norm2 = _layer_norm(e, c, rngs)
        self.bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,), ("vocab",),
                                 L.dtype_of(c.param_dtype))
        self.hidden_act = c.hidden_act

    def __call__(self, hidden: jax.Array, span_boundaries: jax.Array,
                 embeddings: Embeddings) -> jax.Array:
        """``span_boundaries`` [B, P, 3]: (index of x_{s-1}, index of x_{e+1}, offset of the
        predicted token inside its span, from 0); float32 logits [B, P, vocab]."""
        left = _gather(hidden, span_boundaries[..., 0])
        right = _gather(hidden, span_boundaries[..., 1])
        offset = jnp.take(self.position_embeddings[...], span_boundaries[..., 2], axis=0)
        x = jnp.stack([left, right, offset.astype(left.dtype)], axis=-2)  # [B, P, 3, H]
        h = self.norm1(L.ACTIVATIONS[self.hidden_act](self.dense1(x)))
        h = self.norm2(L.ACTIVATIONS[self.hidden_act](self.dense2(h)))
        return embeddings.attend(h) + self.bias[...].astype(jnp.float32)


def _gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x[b, positions[b, p]] -> [B, P, ...]."""
    return jnp.take_along_axis(x, positions[:, :, None].astype(jnp.int32), axis=1)


# --------------------------------------------------------------------------- models


class EncoderModel(nnx.Module):
    """Embeddings -> Transformer -> the heads the config asks for.

    ``embeddings`` lets a second model share the first one's tables (ELECTRA's generator).
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs,
                 embeddings: Embeddings | None = None):
        c = config
        self.config = c
        self.embeddings = embeddings if embeddings is not None else Embeddings(c, rngs=rngs)
        self.encoder = Transformer(c, rngs=rngs)
        h = c.hidden_size
        if c.pooler:
            self.pooler = Dense((h,), (h,), ("embed",), ("mlp",), c, rngs=rngs)
        if c.nsp_head:
            self.nsp = Dense((h,), (2,), ("mlp",), ("classes",), c, rngs=rngs)
        if c.mlm_head:
            self.mlm = MLMHead(c, rngs=rngs)
        if c.discriminator_head:
            self.discriminator = DiscriminatorHead(c, rngs=rngs)
        if c.sbo_head:
            self.sbo = SpanBoundaryHead(c, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        masked_positions: jax.Array | None = None,
        span_boundaries: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        head_mask: jax.Array | None = None,
        enable_dropout: bool = False,
        rngs: nnx.Rngs | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Hidden states and head outputs for [B, L] ids (mask 1 = real token, 0 = padding).

        Packed rows (several examples a row) pass ``segment_ids`` [B, L] (1, 2, ... per example,
        0 padding; attention stays within an example) and ``positions`` [B, L] (restarting at
        0 per example); ``pooled_output`` then reads row position 0 only, so a caller pools
        each example's own [CLS] (``pool``).

        Returns ``last_hidden_state`` [B, L, H], ``hidden_states`` [N + 1, B, L, H] (embedding
        output, then each layer's; only with ``output_hidden_states``), ``pooled_output``,
        ``nsp_logits`` [B, 2], ``mlm_logits`` [B, L, V] (or [B, P, V] at ``masked_positions``
        [B, P], as the original BERT code does, so that unselected positions are never
        projected onto the vocabulary), ``discriminator_logits`` [B, L] and ``sbo_logits``
        [B, P, V] (with ``span_boundaries``, see ``SpanBoundaryHead``); logits are float32.
        With ``output_attentions``: ``attentions`` [N, B, heads, L, L] (float32 softmax
        probabilities; a removed head's are zeros). ``head_mask`` [N, heads] scales each head's
        output. Quantized models also return ``activation_absmax``: each dense input's max|x|
        in this batch, laid out like the ``input_range`` params (``compress.quantize``).
        """
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        k_embed, k_layers = L.dropout_keys(
            bool(c.hidden_dropout_rate or c.attention_dropout_rate), enable_dropout, rngs, 2)
        embedded = (self.embeddings(input_ids, token_type_ids) if positions is None
                    else self.embeddings(input_ids, token_type_ids, positions))
        x = constrain(L.dropout(embedded, c.hidden_dropout_rate, k_embed), HIDDEN)
        if segment_ids is None:
            mask = (attention_mask > 0)[:, None, None, :]
        else:
            mask = L.segment_mask(segment_ids, segment_ids)
        hidden, extras = self.encoder(x, mask, k_layers, output_hidden_states, head_mask,
                                      output_attentions)
        out = {"last_hidden_state": hidden}
        for name in ("hidden_states", "attentions"):
            if name in extras:
                out[name] = extras[name]
        if c.pooler:
            out["pooled_output"] = self.pool(hidden[:, 0])
        if c.nsp_head:
            out["nsp_logits"] = self.nsp(out["pooled_output"]).astype(jnp.float32)
        if c.mlm_head:
            selected = hidden if masked_positions is None else _gather(hidden, masked_positions)
            out["mlm_logits"] = constrain(self.mlm(selected, self.embeddings), LOGITS)
        if c.discriminator_head:
            out["discriminator_logits"] = constrain(self.discriminator(hidden), PER_TOKEN)
        if c.sbo_head and span_boundaries is not None:
            out["sbo_logits"] = constrain(self.sbo(hidden, span_boundaries, self.embeddings),
                                          LOGITS)
        if c.quantize != "none":
            absmax = nnx.to_pure_dict(nnx.pop(self, nnx.Intermediate))
            absmax.setdefault("encoder", {}).update(extras["absmax"])
            out["activation_absmax"] = absmax
        return out


    def pool(self, cls_hidden: jax.Array) -> jax.Array:
        """BERT's pooler, tanh(dense([CLS] hidden state)), on [..., H] states."""
        return jnp.tanh(self.pooler(cls_hidden))


class ElectraPair(nnx.Module):
    """ELECTRA: a small MLM generator and a discriminator that share one embeddings module.

    ``config`` describes the discriminator (with ``discriminator_head``); the generator is
    ``generator_config(config)``. Each part is an ``EncoderModel`` called on its own; the
    family samples the generator's tokens between the two calls. Parameter paths: the shared
    tables live under ``discriminator.embeddings``.
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.discriminator = EncoderModel(config, rngs=rngs)
        self.generator = EncoderModel(generator_config(config), rngs=rngs,
                                      embeddings=self.discriminator.embeddings)
