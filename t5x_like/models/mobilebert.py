"""MobileBERT (Sun et al., 2020) as a Flax NNX module, numerically equal to transformers'
``MobileBertForPreTraining`` (tests/test_mobilebert.py).

Embeddings: E-wide word table; with ``trigram_input`` each token's vector is the concatenation
of its right neighbour's, its own and its left neighbour's (a width-3 convolution: zeros past
the ends), projected 3E -> H (``embedding_transformation``), plus H-wide position and type
tables, then the norm. Each of the N layers keeps an H-wide "inter-block" state and computes in
a B-wide bottleneck (``intra_bottleneck_size``): ``bottleneck`` (dense H -> B + norm) gives the
layer input; with ``key_query_shared_bottleneck`` queries and keys come from a second H -> B
projection and values from the H-wide input; attention (B/heads per head) -> dense -> norm
(+ the layer input); then ``num_feedforward_networks`` stacked FFNs (B -> I -> B, each with its
residual and norm); the last FFN's output goes back B -> H (``output_bottleneck``) and is added
to the layer's H-wide input. An inverted-bottleneck teacher (IB-BERT) is the same body with
B > H. ``normalization_type='no_norm'`` replaces every norm inside the body and the embeddings
by NoNorm (x * scale + bias); the MLM head's transform always uses a real LayerNorm. The MLM
decoder is ``[word_embeddings^T; extra]`` ([H, V]): the tied E-wide table for the first E
features and a separate ``(H - E) x V`` matrix for the rest.
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
from t5x_like.models.config_checks import check_choices, check_scan_unroll, strict_from_dict

NORMS = ("no_norm", "layer_norm")
HIDDEN_ACTS = ("relu", "gelu", "gelu_new")
TORCH_LAYER_NORM_EPS = 1e-5  # transformers builds two of MobileBERT's norms without its eps


@dataclasses.dataclass(frozen=True)
class MobileBertConfig:
    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 512  # inter-block width
    num_layers: int = 24
    num_heads: int = 4
    intermediate_size: int = 512
    intra_bottleneck_size: int = 128  # the body's width (IB-BERT teacher: wider than hidden)
    use_bottleneck: bool = True
    use_bottleneck_attention: bool = False  # q, k and v all from the bottleneck
    key_query_shared_bottleneck: bool = True  # q, k from their own H -> B projection
    num_feedforward_networks: int = 4
    trigram_input: bool = True
    normalization_type: str = "no_norm"
    hidden_act: str = "relu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    classifier_activation: bool = True  # pooler = tanh(dense([CLS])); False: [CLS] as is
    pooler: bool = True
    nsp_head: bool = True
    mlm_head: bool = True
    hidden_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    scan_unroll: int = 0  # layers a trip of the scanned loop; 0: 1 (layers.scan_unroll)

    def __post_init__(self):
        check_scan_unroll("mobilebert", self)
        check_choices("mobilebert", self, {
            "normalization_type": NORMS, "hidden_act": HIDDEN_ACTS,
            "dtype": tuple(L.DTYPES), "param_dtype": tuple(L.DTYPES),
            "remat_policy": tuple(L.REMAT_POLICIES)})
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "intra_bottleneck_size", "num_feedforward_networks",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise UserError(f"mobilebert config field {name} must be positive, got "
                                f"{getattr(self, name)}")
        if self.true_hidden_size % self.num_heads:
            raise UserError(f"mobilebert attention width {self.true_hidden_size} (the "
                            f"bottleneck's) is not divisible by num_heads={self.num_heads}")
        if self.mlm_head and self.embedding_size > self.hidden_size:
            raise UserError(f"mobilebert embedding_size={self.embedding_size} exceeds "
                            f"hidden_size={self.hidden_size}; the MLM decoder is "
                            "[embeddings^T; extra] and needs E <= H")
        if self.nsp_head and not self.pooler:
            raise UserError("mobilebert nsp_head=True needs pooler=True")
        for name in ("hidden_dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"mobilebert {name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MobileBertConfig:
        return strict_from_dict(cls, "mobilebert", d)

    @property
    def true_hidden_size(self) -> int:
        """The width attention and the FFNs work in: the bottleneck's, or H without one."""
        return self.intra_bottleneck_size if self.use_bottleneck else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.true_hidden_size // self.num_heads

    @property
    def model_type(self) -> str:
        """The transformers layout (BERT's special tokens: [CLS] A [SEP] B [SEP])."""
        return "mobilebert"


class Linear(nnx.Module):
    """``x @ kernel + bias``; kernel [in, out] with logical names."""

    def __init__(self, n_in: int, n_out: int, names: tuple[str, str], c: MobileBertConfig, *,
                 rngs: nnx.Rngs, bias: bool = True):
        pdt = L.dtype_of(c.param_dtype)
        self.kernel = L.make_param(rngs, L.normal(c.initializer_range), (n_in, n_out), names, pdt)
        if bias:
            self.bias = L.make_param(rngs, jax.nn.initializers.zeros, (n_out,), names[1:], pdt)
        self.dtype = L.dtype_of(c.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = L.dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype) if hasattr(self, "bias") else y


class NoNorm(nnx.Module):
    """MobileBERT's NoNorm: ``x * scale + bias`` (no statistics)."""

    def __init__(self, dim: int, name: str, c: MobileBertConfig, *, rngs: nnx.Rngs):
        pdt = L.dtype_of(c.param_dtype)
        self.scale = L.make_param(rngs, jax.nn.initializers.ones, (dim,), (name,), pdt)
        self.bias = L.make_param(rngs, jax.nn.initializers.zeros, (dim,), (name,), pdt)
        self.dtype = L.dtype_of(c.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x * self.scale[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
                ).astype(self.dtype)


def _norm(dim: int, c: MobileBertConfig, rngs: nnx.Rngs, *, name: str = "embed",
          eps: float | None = None) -> nnx.Module:
    """The body's norm: NoNorm, or a LayerNorm (eps: the config's unless transformers uses
    torch's default at that site)."""
    if c.normalization_type == "no_norm":
        return NoNorm(dim, name, c, rngs=rngs)
    return L.LayerNorm(dim, eps=c.layer_norm_eps if eps is None else eps,
                       dtype=L.dtype_of(c.dtype), param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)


class Embeddings(nnx.Module):
    """E-wide word table (trigram-concatenated, projected to H) + position + type; norm."""

    def __init__(self, c: MobileBertConfig, *, rngs: nnx.Rngs):
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        h, e = c.hidden_size, c.embedding_size
        self.word_embeddings = L.make_param(rngs, init, (c.vocab_size, e), ("vocab", "embed"), pdt)
        self.position_embeddings = L.make_param(rngs, init, (c.max_position_embeddings, h),
                                                ("position", "embed"), pdt)
        if c.type_vocab_size:
            self.token_type_embeddings = L.make_param(rngs, init, (c.type_vocab_size, h),
                                                      ("type", "embed"), pdt)
        width = 3 * e if c.trigram_input else e
        # transformers always holds this dense (and so a checkpoint), used only when needed.
        self.embedding_transformation = Linear(width, h, ("mlp", "embed"), c, rngs=rngs)
        self.project = c.trigram_input or e != h
        self.norm = _norm(h, c, rngs, eps=TORCH_LAYER_NORM_EPS)
        self.trigram_input = c.trigram_input

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        rows = self.position_embeddings.shape[0]
        if length > rows:
            raise UserError(f"sequence length {length} exceeds the model's {rows} position "
                            "embeddings; shorten data.inputs_length")
        x = jnp.take(self.word_embeddings[...], input_ids, axis=0).astype(jnp.float32)
        if self.trigram_input:  # [next token, this token, previous token], zeros past the ends
            nxt = jnp.pad(x[:, 1:], ((0, 0), (0, 1), (0, 0)))
            prev = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
            x = jnp.concatenate([nxt, x, prev], axis=-1)
        if self.project:
            x = self.embedding_transformation(x).astype(jnp.float32)
        x = x + self.position_embeddings[:length][None].astype(jnp.float32)
        if hasattr(self, "token_type_embeddings"):
            x = x + jnp.take(self.token_type_embeddings[...], token_type_ids,
                             axis=0).astype(jnp.float32)
        return self.norm(x)


class FFN(nnx.Module):
    """One stacked feed-forward network: norm(x + W_out act(W_in x)) in the bottleneck width."""

    def __init__(self, c: MobileBertConfig, *, rngs: nnx.Rngs):
        b, i = c.true_hidden_size, c.intermediate_size
        self.intermediate = Linear(b, i, ("embed", "mlp"), c, rngs=rngs)
        self.output = Linear(i, b, ("mlp", "embed"), c, rngs=rngs)
        self.norm = _norm(b, c, rngs)
        self.act = L.ACTIVATIONS[c.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.output(self.act(self.intermediate(x))) + x)


class Layer(nnx.Module):
    """One MobileBERT block (module docstring)."""

    def __init__(self, c: MobileBertConfig, *, rngs: nnx.Rngs):
        h, b, n, d = c.hidden_size, c.true_hidden_size, c.num_heads, c.head_dim
        if c.use_bottleneck:
            self.bottleneck = Linear(h, b, ("embed", "mlp"), c, rngs=rngs)
            self.bottleneck_norm = _norm(b, c, rngs, name="mlp")
            if c.key_query_shared_bottleneck and not c.use_bottleneck_attention:
                self.attention_bottleneck = Linear(h, b, ("embed", "mlp"), c, rngs=rngs)
                self.attention_bottleneck_norm = _norm(b, c, rngs, name="mlp")
        value_in = b if (c.use_bottleneck_attention or not c.use_bottleneck) else h
        pdt, init = L.dtype_of(c.param_dtype), L.normal(c.initializer_range)
        zeros = jax.nn.initializers.zeros
        self.query = L.make_param(rngs, init, (b, n, d), ("embed", "heads", "kv"), pdt)
        self.query_bias = L.make_param(rngs, zeros, (n * d,), ("heads",), pdt)
        self.key = L.make_param(rngs, init, (b, n, d), ("embed", "heads", "kv"), pdt)
        self.key_bias = L.make_param(rngs, zeros, (n * d,), ("heads",), pdt)
        self.value = L.make_param(rngs, init, (value_in, n, d), ("embed", "heads", "kv"), pdt)
        self.value_bias = L.make_param(rngs, zeros, (n * d,), ("heads",), pdt)
        self.attention_out = L.make_param(rngs, init, (n, d, b), ("heads", "kv", "embed"), pdt)
        self.attention_out_bias = L.make_param(rngs, zeros, (b,), ("embed",), pdt)
        self.attention_norm = _norm(b, c, rngs)
        self.ffns = nnx.List([FFN(c, rngs=rngs) for _ in range(c.num_feedforward_networks - 1)])
        self.intermediate = Linear(b, c.intermediate_size, ("embed", "mlp"), c, rngs=rngs)
        self.output = Linear(c.intermediate_size, b, ("mlp", "embed"), c, rngs=rngs)
        self.output_norm = _norm(b, c, rngs, eps=TORCH_LAYER_NORM_EPS)
        if c.use_bottleneck:
            self.output_bottleneck = Linear(b, h, ("mlp", "embed"), c, rngs=rngs)
            self.output_bottleneck_norm = _norm(h, c, rngs)
        self.config = c

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        dt = x.dtype
        w, bias = getattr(self, name)[...].astype(dt), getattr(self, f"{name}_bias")[...]
        return jnp.einsum("bld,dnh->blnh", x, w) + bias.reshape(w.shape[1:]).astype(dt)

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None,
                 with_probs: bool) -> tuple[jax.Array, jax.Array | None]:
        """(the block's H-wide output, attention probabilities [B, heads, L, L] or None)."""
        c = self.config
        k_attn, k_out, k_ffn, k_last = L.split_key(key, 4)
        x = x.astype(L.dtype_of(c.dtype))
        if c.use_bottleneck:
            layer_input = self.bottleneck_norm(self.bottleneck(x))
            if c.use_bottleneck_attention:
                q_in = v_in = layer_input
            elif hasattr(self, "attention_bottleneck"):
                q_in = self.attention_bottleneck_norm(self.attention_bottleneck(x))
                v_in = x
            else:
                q_in = v_in = x
        else:
            layer_input = q_in = v_in = x
        q = self._project(q_in, "query") * jnp.asarray(c.head_dim ** -0.5, q_in.dtype)
        k, v = self._project(q_in, "key"), self._project(v_in, "value")
        probs = None
        if with_probs:
            y, probs = L.attention_with_probs(q, k, v, bias=None, mask=mask,
                                              dropout_rate=c.attention_dropout_rate,
                                              dropout_key=k_attn)
        else:
            y = L.attention(q, k, v, bias=None, mask=mask, dropout_rate=c.attention_dropout_rate,
                            dropout_key=k_attn)
        y = jnp.einsum("blnh,nhd->bld", y, self.attention_out[...].astype(y.dtype))
        y = y + self.attention_out_bias[...].astype(y.dtype)
        if not c.use_bottleneck:
            y = L.dropout(y, c.hidden_dropout_rate, k_out)
        h = self.attention_norm(y + layer_input)
        for ffn in self.ffns:
            h = ffn(h)
        out = self.output(L.ACTIVATIONS[c.hidden_act](self.intermediate(h)))
        if not c.use_bottleneck:
            return self.output_norm(L.dropout(out, c.hidden_dropout_rate, k_ffn) + h), probs
        out = self.output_norm(out + h)
        out = L.dropout(self.output_bottleneck(out), c.hidden_dropout_rate, k_last)
        return self.output_bottleneck_norm(out + x), probs


class MLMHead(nnx.Module):
    """dense H -> H, activation, LayerNorm, then ``[word_embeddings^T; extra]`` + bias."""

    def __init__(self, c: MobileBertConfig, *, rngs: nnx.Rngs):
        h, e = c.hidden_size, c.embedding_size
        self.transform = Linear(h, h, ("embed", "mlp"), c, rngs=rngs)
        self.norm = L.LayerNorm(h, eps=c.layer_norm_eps, dtype=L.dtype_of(c.dtype),
                                param_dtype=L.dtype_of(c.param_dtype), rngs=rngs)
        pdt = L.dtype_of(c.param_dtype)
        if h > e:
            self.extra = L.make_param(rngs, L.normal(c.initializer_range), (h - e, c.vocab_size),
                                      ("mlp", "vocab"), pdt)
        self.bias = L.make_param(rngs, jax.nn.initializers.zeros, (c.vocab_size,), ("vocab",),
                                 pdt)
        self.act = L.ACTIVATIONS[c.hidden_act]
        self.embedding_size = e

    def __call__(self, x: jax.Array, embeddings: Embeddings) -> jax.Array:
        h = self.norm(self.act(self.transform(x)))
        e = self.embedding_size
        table = embeddings.word_embeddings[...].astype(h.dtype)
        logits = L.dense(h[..., :e], table, kernel_transposed=True,
                         preferred_element_type=jnp.float32)
        if hasattr(self, "extra"):
            logits = logits + L.dense(h[..., e:], self.extra[...].astype(h.dtype),
                                      preferred_element_type=jnp.float32)
        return logits + self.bias[...].astype(jnp.float32)


def _gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x[b, positions[b, p]] -> [B, P, ...]."""
    return jnp.take_along_axis(x, positions[:, :, None].astype(jnp.int32), axis=1)


class MobileBertModel(nnx.Module):
    """Embeddings -> N MobileBERT blocks -> pooler, NSP and MLM heads (as configured)."""

    def __init__(self, config: MobileBertConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embeddings = Embeddings(c, rngs=rngs)
        self.layers = L.make_stack(lambda r: Layer(c, rngs=r), c.num_layers, rngs,
                                   scan=c.scan_layers)
        h = c.hidden_size
        if c.pooler and c.classifier_activation:
            self.pooler = Linear(h, h, ("embed", "mlp"), c, rngs=rngs)
        if c.nsp_head:
            self.nsp = Linear(h, 2, ("mlp", "classes"), c, rngs=rngs)
        if c.mlm_head:
            self.mlm = MLMHead(c, rngs=rngs)

    def pool(self, cls_hidden: jax.Array) -> jax.Array:
        """tanh(dense([CLS])) (``classifier_activation``), else the [CLS] state itself."""
        return jnp.tanh(self.pooler(cls_hidden)) if hasattr(self, "pooler") else cls_hidden

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        masked_positions: jax.Array | None = None,
        span_boundaries: None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        enable_dropout: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """``last_hidden_state`` [B, L, H]; ``hidden_states`` [N + 1, B, L, H] and
        ``attentions`` [N, B, heads, L, L] when asked; ``pooled_output``, ``nsp_logits``
        [B, 2] and ``mlm_logits`` [B, L | P, V] (at ``masked_positions`` [B, P] if given), as
        configured; logits are float32. Mask: 1 = real token, 0 = padding."""
        c = self.config
        if span_boundaries is not None:
            raise UserError("MobileBERT has no span-boundary head; set "
                            "objective.span_boundary_objective=False")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        k_embed, k_layers = L.dropout_keys(
            bool(c.hidden_dropout_rate or c.attention_dropout_rate), enable_dropout, rngs, 2)
        x = L.dropout(self.embeddings(input_ids, token_type_ids), c.hidden_dropout_rate, k_embed)
        x = x.astype(L.dtype_of(c.dtype))
        mask = (attention_mask > 0)[:, None, None, :]
        keys = L.layer_keys(k_layers, c.num_layers)

        def body(layer, h, key):
            y, probs = layer(h, mask, key, output_attentions)
            out = {}
            if output_hidden_states:
                out["hidden"] = y
            if output_attentions:
                out["attentions"] = probs
            return y, out

        hidden, outs = L.run_stack(self.layers, x, keys, body, scan=c.scan_layers,
                                   remat_policy=c.remat_policy, unroll=c.scan_unroll)
        out = {"last_hidden_state": hidden}
        if output_hidden_states:
            out["hidden_states"] = jnp.concatenate([x[None], outs["hidden"]])
        if output_attentions:
            out["attentions"] = outs["attentions"]
        if c.pooler:
            out["pooled_output"] = self.pool(hidden[:, 0])
        if c.nsp_head:
            out["nsp_logits"] = self.nsp(out["pooled_output"]).astype(jnp.float32)
        if c.mlm_head:
            selected = hidden if masked_positions is None else _gather(hidden, masked_positions)
            out["mlm_logits"] = self.mlm(selected, self.embeddings)
        return out
