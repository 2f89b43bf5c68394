"""Building blocks shared by the architectures: norms, embeddings, attention, MLPs, layer stacks.

Every parameter names its logical axes (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``relpos_buckets``; stacks add ``layers``) and nothing else about placement:
``partitioning.py`` maps the names to mesh axes. Modules hold parameters only — no RNG state —
so a model split once with ``nnx.split(model, nnx.Param)`` is a pure function of its params;
dropout takes a key at call time. The KV-cache helpers at the end serve every decoder's
incremental decoding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.models import cpu_matmul
from t5x_like.models.activation_sharding import one_device_cpu_step, step_devices
from t5x_like.models.softmax_attention import masked_logits, softmax_attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Which intermediates a layer keeps for the backward pass (the rest is recomputed).
# "minimal" keeps the projections' outputs (dots without batch dims: q/k/v/o, MLP) and
# recomputes the cheap attention and elementwise work; "dots" also keeps attention's
# (batched) matmul outputs and its softmax probabilities ("attention_probs", as large as the
# logits they replace) and recomputes only the rest of the elementwise work (GELU, norms):
# on the T5 bench config, scanned, 1.080x the unrolled step against 1.101x with the dots alone
# (4 interleaved rounds in one process, 2026-12-04). "full" keeps only the layer inputs.
_POLICY = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "minimal": _POLICY.checkpoint_dots_with_no_batch_dims,
    "dots": _POLICY.save_from_both_policies(_POLICY.checkpoint_dots,
                                            _POLICY.save_only_these_names("attention_probs")),
    "full": _POLICY.nothing_saveable,
}

LAYERS_AXIS = "layers"


def scan_unroll(requested: int = 0, *, one_cpu_device: int = 1) -> int:
    """Layers a trip of a scanned stack's loop: ``requested``, or where the model config leaves
    it open (0) ``one_cpu_device`` on a one-device XLA:CPU step and 1 on any other. A model
    passes what it measured faster on CPU (T5: 2); more than one layer a trip on a sharded step
    can move a gradient's all-reduce into the loop (``T5_CPU_SCAN_UNROLL`` in t5.py)."""
    if requested:
        return requested
    return one_cpu_device if one_device_cpu_step() else 1


# "auto" is our softmax_attention; "xla" and "cudnn" are jax.nn.dot_product_attention's backends,
# "cudnn" being cuDNN's fused (flash) kernel on NVIDIA GPUs (bf16/fp16 inputs only).
ATTENTION_IMPLEMENTATIONS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]


def make_param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: Sequence[int],
    names: tuple[str, ...],
    dtype: Any,
) -> nnx.Param:
    """A parameter annotated with one logical axis name per dimension."""
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), tuple(shape), dtype))


def normal(std: float) -> Callable:
    return jax.nn.initializers.normal(std)


def dense(x: jax.Array, kernel: jax.Array, *, contract: int = 1, kernel_transposed: bool = False,
          preferred_element_type: Any = None) -> jax.Array:
    """``x [..., *k] @ kernel [*k, *out] -> [..., *out]`` as one matmul over flattened rows.

    ``contract`` is how many trailing axes of ``x`` (leading axes of ``kernel``) are summed;
    ``kernel_transposed`` takes the kernel as [out, *k] (a tied embedding table). Why rows:
    for an einsum with two free axes (batch, length), XLA:CPU fuses a transposing copy into the
    weight gradient's elementwise producer, which doubled the T5 MLP's forward+backward time
    (300 vs 150 ms at 8x512 tokens); with one row axis the gradient is a plain matmul.
    """
    lead, k_shape = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    rows = x.reshape(-1, math.prod(k_shape))
    if kernel_transposed:
        y = jax.lax.dot_general(rows, kernel.reshape(kernel.shape[0], -1), (((1,), (1,)), ((), ())),
                                preferred_element_type=preferred_element_type)
        out_shape = kernel.shape[:1]
    else:
        y = cpu_matmul.matmul(rows, kernel.reshape(rows.shape[1], -1), preferred_element_type)
        out_shape = kernel.shape[contract:]
    return y.reshape(*lead, *out_shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op without a key (evaluation, or dropout disabled)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n independent keys, or n Nones when dropout is off (keeps call sites branch-free)."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def dropout_keys(rate_used: bool, enable_dropout: bool, rngs: nnx.Rngs | None,
                 n: int) -> list[jax.Array | None]:
    """n dropout keys from ``rngs`` when dropout is on (and some rate is non-zero), else Nones."""
    if not enable_dropout or not rate_used:
        return [None] * n
    if rngs is None:
        raise ValueError("enable_dropout=True needs rngs=nnx.Rngs(dropout=key)")
    return split_key(rngs.dropout(), n)


def layer_keys(key: jax.Array | None, n: int) -> jax.Array | None:
    """One key per layer stacked on a leading axis (``run_stack``'s per-layer input), or None."""
    return None if key is None else jax.random.split(key, n)


# --------------------------------------------------------------------------- norms, embeddings


class RMSNorm(nnx.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.scale = make_param(rngs, jax.nn.initializers.ones, (dim,), ("embed",),
                                param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Mean/variance layer norm with scale and bias (BERT, GPT-2, BART, XLNet); float32 stats."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.scale = make_param(rngs, jax.nn.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = make_param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(self.dtype)


@jax.custom_vjp
def _lookup_one_hot_grad(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids):
    return jnp.take(table, ids, axis=0), (ids, table.shape[0])


def _lookup_bwd(res, g):
    ids, vocab = res
    hot = (ids[..., None] == jnp.arange(vocab)).astype(g.dtype)
    # HIGHEST: each gradient row sums its own ids' cotangents only, never bf16-cut on TPU
    grad = jnp.einsum("...v,...d->vd", hot, g, precision=jax.lax.Precision.HIGHEST)
    return grad, None


_lookup_one_hot_grad.defvjp(_lookup_fwd, _lookup_bwd)


class Embed(nnx.Module):
    """Token embedding table; ``attend`` reuses it as an output projection (tied heads).

    Inside a step on several devices (``one_hot=None``) the table's gradient is a one-hot
    matmul, as in T5X's ``Embed(one_hot=True)``: a gather's gradient is a scatter-add, which
    XLA's SPMD partitioner serves by all-gathering the whole batch's cotangents and ids onto
    every chip (across slices too), while a matmul's is summed like any weight's. The lookup
    itself stays a gather, so the forward numbers are the same bits; the gradient costs
    2 x tokens x vocab x dim FLOPs, so one device keeps the scatter-add (a one-hot lookup and
    gradient at T5 small's shapes took 60x the gather's on one CPU).
    """

    def __init__(self, vocab_size: int, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 one_hot: bool | None = None):
        self.embedding = make_param(rngs, normal(1.0), (vocab_size, dim), ("vocab", "embed"),
                                    param_dtype)
        self.dtype = dtype
        self.one_hot = one_hot  # None: one-hot gradient when the step has several devices

    def __call__(self, ids: jax.Array) -> jax.Array:
        one_hot = self.one_hot if self.one_hot is not None else step_devices() > 1
        lookup = _lookup_one_hot_grad if one_hot else functools.partial(jnp.take, axis=0)
        return lookup(self.embedding[...], ids).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Float32 logits x @ E^T, accumulated in float32 whatever the compute dtype."""
        table = self.embedding[...].astype(self.dtype)
        return dense(x, table, kernel_transposed=True, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------- attention


def segment_mask(query_segments: jax.Array, key_segments: jax.Array, *,
                 causal: bool = False) -> jax.Array:
    """[B, 1, T, S]: True where query and key belong to the same packed example.

    Segment ids number the examples of a packed row from 1; 0 is padding, which no query
    attends to. ``causal`` also hides later keys (decoder self-attention).
    """
    same = query_segments[:, :, None] == key_segments[:, None, :]
    mask = same & (key_segments[:, None, :] > 0)
    if causal:
        t, s = query_segments.shape[1], key_segments.shape[1]
        mask = mask & jnp.tril(jnp.ones((t, s), bool))[None]
    return mask[:, None]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None,
    mask: jax.Array | None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Unscaled dot-product attention on [B, T, N, H] x [B, S, N, H], softmax in float32.

    T5 folds 1/sqrt(d_kv) into the query init, so ``scale=1``. Without dropout,
    ``implementation`` None runs ``softmax_attention`` (our backward, faster on XLA:CPU) and
    "xla"/"cudnn" run ``jax.nn.dot_product_attention`` with that backend. Neither takes dropout
    on the probabilities, so a dropout-enabled training call takes the explicit path (same
    math; all three are checked equal in the tests).
    """
    if dropout_key is None or dropout_rate == 0.0:
        if implementation is None:
            return softmax_attention(q, k, v, bias=bias, mask=mask)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0,
                                            implementation=implementation)
    return explicit_attention(q, k, v, bias=bias, mask=mask, dropout_rate=dropout_rate,
                              dropout_key=dropout_key)


def explicit_attention(q, k, v, *, bias, mask, dropout_rate=0.0, dropout_key=None) -> jax.Array:
    """``attention`` spelled out (dropout on the probabilities is possible here)."""
    return attention_with_probs(q, k, v, bias=bias, mask=mask, dropout_rate=dropout_rate,
                                dropout_key=dropout_key)[0]


def attention_with_probs(q, k, v, *, bias, mask, dropout_rate=0.0,
                         dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """(output, float32 probabilities [B, heads, T, S] before dropout): the explicit path, whose
    probabilities distillation (TinyBERT) reads."""
    probs = jax.nn.softmax(masked_logits(q, k, bias, mask), axis=-1)
    y = jnp.einsum("bnts,bsnh->btnh", dropout(probs, dropout_rate, dropout_key).astype(v.dtype), v)
    return y, probs


class Attention(nnx.Module):
    """Multi-head attention with 3-D kernels: q/k/v [embed, heads, kv], out [heads, kv, embed]."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int, *, dropout_rate: float,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs, implementation: str | None = None):
        qkv, shape = ("embed", "heads", "kv"), (d_model, num_heads, d_kv)
        # T5's init: the query absorbs the 1/sqrt(d_kv) that other models put in the softmax.
        self.query = make_param(rngs, normal((d_model * d_kv) ** -0.5), shape, qkv, param_dtype)
        self.key = make_param(rngs, normal(d_model**-0.5), shape, qkv, param_dtype)
        self.value = make_param(rngs, normal(d_model**-0.5), shape, qkv, param_dtype)
        self.out = make_param(rngs, normal((num_heads * d_kv) ** -0.5),
                              (num_heads, d_kv, d_model), ("heads", "kv", "embed"), param_dtype)
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        self.implementation = implementation

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, N, H] (what a KV cache stores)."""
        k = dense(x, self.key[...].astype(self.dtype))
        v = dense(x, self.value[...].astype(self.dtype))
        return k, v

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None,
                 mask: jax.Array | None, dropout_key: jax.Array | None = None) -> jax.Array:
        q = dense(x, self.query[...].astype(self.dtype))
        y = attention(q, k, v, bias=bias, mask=mask, dropout_rate=self.dropout_rate,
                      dropout_key=dropout_key, implementation=self.implementation)
        return dense(y, self.out[...].astype(self.dtype), contract=2)


def _zeros(rngs: nnx.Rngs, shape: Sequence[int], names: tuple[str, ...], dtype: Any) -> nnx.Param:
    return make_param(rngs, jax.nn.initializers.zeros, shape, names, dtype)


class MultiHeadAttention(nnx.Module):
    """Attention with optional biases and softmax(q k^T / sqrt(d_kv)) (GPT-2 and BART's scale).

    Kernels as ``Attention``: q/k/v [embed, heads, kv], out [heads, kv, embed]; biases
    q/k/v [heads, kv], out [embed]. The scale is applied to the projected query.
    """

    def __init__(self, d_model: int, num_heads: int, d_kv: int, *, use_bias: bool,
                 init_std: float, out_init_std: float, dropout_rate: float, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        qkv, shape = ("embed", "heads", "kv"), (d_model, num_heads, d_kv)
        self.query = make_param(rngs, normal(init_std), shape, qkv, param_dtype)
        self.key = make_param(rngs, normal(init_std), shape, qkv, param_dtype)
        self.value = make_param(rngs, normal(init_std), shape, qkv, param_dtype)
        self.out = make_param(rngs, normal(out_init_std), (num_heads, d_kv, d_model),
                              ("heads", "kv", "embed"), param_dtype)
        if use_bias:
            self.query_bias = _zeros(rngs, (num_heads, d_kv), ("heads", "kv"), param_dtype)
            self.key_bias = _zeros(rngs, (num_heads, d_kv), ("heads", "kv"), param_dtype)
            self.value_bias = _zeros(rngs, (num_heads, d_kv), ("heads", "kv"), param_dtype)
            self.out_bias = _zeros(rngs, (d_model,), ("embed",), param_dtype)
        self.use_bias = use_bias
        self.scale = d_kv**-0.5
        self.dropout_rate = dropout_rate
        self.dtype = dtype

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = dense(x, getattr(self, name)[...].astype(self.dtype))
        return y + getattr(self, f"{name}_bias")[...].astype(self.dtype) if self.use_bias else y

    def project_q(self, x: jax.Array) -> jax.Array:
        """Scaled queries [B, T, N, H]."""
        return self._project(x, "query") * jnp.asarray(self.scale, self.dtype)

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, N, H] (what a KV cache stores)."""
        return self._project(x, "key"), self._project(x, "value")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
               dropout_key: jax.Array | None = None) -> jax.Array:
        y = attention(q, k, v, bias=None, mask=mask, dropout_rate=self.dropout_rate,
                      dropout_key=dropout_key)
        y = dense(y, self.out[...].astype(self.dtype), contract=2)
        return y + self.out_bias[...].astype(self.dtype) if self.use_bias else y


# --------------------------------------------------------------------------- relative positions


def relative_position_buckets(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucket of ``key_pos - query_pos``: exact for small distances, log-spaced after.

    Computed in numpy float32 with the same operation order as the reference code, at trace
    time (lengths are static), so the buckets are constants. Unidirectional (decoder) buckets
    only distinguish keys in the past; future keys fall into bucket 0 (they are masked anyway).
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        distance = np.abs(rel)
    else:
        distance = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    scaled = (
        np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class RelativePositionBias(nnx.Module):
    """One learned scalar per (bucket, head), computed once per stack and shared by its layers."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, *, bidirectional: bool,
                 init_std: float, param_dtype: Any, rngs: nnx.Rngs):
        self.embedding = make_param(rngs, normal(init_std), (num_buckets, num_heads),
                                    ("relpos_buckets", "heads"), param_dtype)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def _buckets(self, relative_position: np.ndarray) -> np.ndarray:
        return relative_position_buckets(relative_position, bidirectional=self.bidirectional,
                                         num_buckets=self.num_buckets,
                                         max_distance=self.max_distance)

    def __call__(self, query_length: int, key_length: int) -> jax.Array:
        """Float32 bias [1, heads, query_length, key_length].

        Gathered from the [heads, buckets] table so that the gradient's scatter reads the
        summed [heads, T, S] bias gradient as it lies: gathering rows of [buckets, heads] and
        transposing made XLA:CPU transpose that gradient to heads-minor first, a copy with
        4-float rows (11.7 ms a step for T5's 512-token encoder on the bench machine).
        """
        rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
        return jnp.take(self._heads_major_table(), self._buckets(rel), axis=1)[None]

    def _heads_major_table(self) -> jax.Array:
        return jnp.transpose(self.embedding[...].astype(jnp.float32))

    def at_position(self, position: jax.Array, key_length: int) -> jax.Array:
        """Bias [1, heads, 1, key_length] for one query at a traced ``position`` (decoding)."""
        table = self._buckets(np.arange(-(key_length - 1), key_length))  # rel = key - query
        buckets = jax.lax.dynamic_slice(jnp.asarray(table), (key_length - 1 - position,),
                                        (key_length,))
        return jnp.take(self._heads_major_table(), buckets, axis=1)[None, :, None, :]


# --------------------------------------------------------------------------- feed-forward


# Feed-forward activations by their transformers names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (GPT-2, T5)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf): BERT, BART, XLNet
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # with gated=True: Llama's SwiGLU
}


class FeedForward(nnx.Module):
    """act(x Wi + b) Wo + b, or gated act(x W0) * (x W1) Wo; dropout on the hidden activations.

    Kernels ``wi`` (gated: ``wi_0``, ``wi_1``) [embed, mlp] and ``wo`` [mlp, embed]. With
    ``use_bias`` each kernel's bias is ``<kernel>_bias`` unless ``bias_names`` names it otherwise
    (XLNet's ``bi``/``bo``): the names are checkpoint paths, so each model keeps its own.
    """

    def __init__(self, d_model: int, d_ff: int, *, activation: str, gated: bool, use_bias: bool,
                 init_std: float, out_init_std: float, dropout_rate: float, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs, bias_names: dict[str, str] | None = None):
        self.inputs = ("wi_0", "wi_1") if gated else ("wi",)
        named = bias_names or {}
        self.biases = tuple((w, named.get(w, f"{w}_bias")) for w in (*self.inputs, "wo")
                            if use_bias)
        bias_of = dict(self.biases)
        for name in self.inputs:
            setattr(self, name, make_param(rngs, normal(init_std), (d_model, d_ff),
                                           ("embed", "mlp"), param_dtype))
            if use_bias:
                setattr(self, bias_of[name], _zeros(rngs, (d_ff,), ("mlp",), param_dtype))
        self.wo = make_param(rngs, normal(out_init_std), (d_ff, d_model), ("mlp", "embed"),
                             param_dtype)
        if use_bias:
            setattr(self, bias_of["wo"], _zeros(rngs, (d_model,), ("embed",), param_dtype))
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.dtype = dtype

    def _dense(self, x: jax.Array, name: str) -> jax.Array:
        y = dense(x, getattr(self, name)[...].astype(self.dtype))
        bias = dict(self.biases).get(name)
        return y if bias is None else y + getattr(self, bias)[...].astype(self.dtype)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        h = ACTIVATIONS[self.activation](self._dense(x, self.inputs[0]))
        if len(self.inputs) == 2:
            h = h * self._dense(x, self.inputs[1])
        return self._dense(dropout(h, self.dropout_rate, dropout_key), "wo")


# --------------------------------------------------------------------------- layer stacks


def make_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs, *,
               scan: bool) -> nnx.Module:
    """``num_layers`` layers: stacked by ``nnx.vmap`` (leading ``layers`` axis) or a list."""
    if not scan:
        return nnx.List([make_layer(rngs) for _ in range(num_layers)])

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def create(key):
        return make_layer(nnx.Rngs(params=key))

    return create(jax.random.split(rngs.params(), num_layers))


def rematerialise(fn: Callable, remat_policy: str, *, prevent_cse: bool,
                  static_argnums: int | tuple[int, ...] = ()) -> Callable:
    """``fn`` under ``jax.checkpoint`` with the named policy (unchanged for "none"). Its dense
    layers materialise their recomputed rows before transposing them (see cpu_matmul)."""
    if remat_policy == "none":
        return fn
    fn = jax.checkpoint(fn, policy=REMAT_POLICIES[remat_policy], prevent_cse=prevent_cse,
                        static_argnums=static_argnums)
    return cpu_matmul.recomputed_rows(fn)


def run_stack(
    layers: nnx.Module,
    carry: Any,
    per_layer: Any,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    *,
    scan: bool,
    remat_policy: str,
    unroll: int = 0,
    cpu_unroll: int = 1,
) -> tuple[Any, Any]:
    """Applies ``body(layer, carry, per_layer[i]) -> (carry, out_i)`` layer by layer.

    ``per_layer`` and the stacked outputs have a leading layer axis in both modes, so callers
    (e.g. the KV cache) see one layout. ``body`` is rematerialised per layer by the policy.

    The loop is plain ``jax.lax.scan`` over the split layer state, each step merging its slice
    back into a module: unlike ``nnx.scan``/``nnx.remat``, this also works when the model was
    merged outside an enclosing ``lax`` loop (NNX refuses Variables from an outer trace).
    A scanned loop runs ``scan_unroll(unroll, one_cpu_device=cpu_unroll)`` layers a trip (a
    remainder trip when they do not divide the stack).
    """
    def apply(graphdef, layer_state, carry, xs):
        return body(nnx.merge(graphdef, layer_state), carry, xs)

    # Inside a scan no CSE across iterations can happen, so prevent_cse would only cost.
    apply = rematerialise(apply, remat_policy, prevent_cse=not scan, static_argnums=0)
    if scan:
        graphdef, state = nnx.split(layers)
        return jax.lax.scan(lambda c, xs: apply(graphdef, xs[0], c, xs[1]), carry,
                            (state, per_layer),
                            unroll=scan_unroll(unroll, one_cpu_device=cpu_unroll))
    outs = []
    for i, layer in enumerate(layers):
        graphdef, state = nnx.split(layer)
        carry, out = apply(graphdef, state, carry, jax.tree.map(lambda a, i=i: a[i], per_layer))
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


# --------------------------------------------------------------------------- decoding caches


KV_NAMES = ("self_key", "self_value")  # an encoder-decoder's cache entries (GPT's: key, value)


def write_slots(buffer: jax.Array, x: jax.Array, start: Any) -> jax.Array:
    """``buffer`` [..., S, heads, d_kv] with ``x`` [..., T, heads, d_kv] in slots start..start+T-1
    (one layer's cache, or the stacked [layers, ...] one)."""
    return jax.lax.dynamic_update_slice(buffer, x, (0,) * (x.ndim - 3) + (start, 0, 0))


def extend_kv(cache: dict[str, jax.Array] | None, k: jax.Array, v: jax.Array, start: Any, *,
              names: tuple[str, str] = KV_NAMES) -> tuple[jax.Array, jax.Array, tuple | None]:
    """A decoder layer's (keys, values, new) for its new tokens' ``k``/``v`` [B, T, N, H]:
    without a cache those and None; with this layer's ``cache``, its keys/values with the new
    ones written at slot ``start`` (to attend over) and the new (k, v) (for the caller to store).
    """
    if cache is None:
        return k, v, None
    return (write_slots(cache[names[0]], k, start), write_slots(cache[names[1]], v, start),
            (k, v))


def write_kv(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array, start: Any, *,
             names: tuple[str, str] = KV_NAMES) -> dict[str, jax.Array]:
    """``cache`` with every layer's new keys/values [layers, B, T, N, H] at slot ``start``."""
    return {**cache, names[0]: write_slots(cache[names[0]], k, start),
            names[1]: write_slots(cache[names[1]], v, start)}


def encoder_decoder_cache(decoder_layers: nnx.Module, shape: tuple[int, ...], dtype: Any,
                          encoded: jax.Array | None, *, scan: bool,
                          remat_policy: str) -> dict[str, jax.Array]:
    """Zeroed ``self_key``/``self_value`` of ``shape`` [layers, B, max_len, heads, d_kv]; with
    ``encoded``, also every decoder layer's ``cross_attention`` keys/values of it (``cross_key``/
    ``cross_value`` [layers, B, L, heads, d_kv]), so decoding steps do not re-project it."""
    cache = {"self_key": jnp.zeros(shape, dtype), "self_value": jnp.zeros(shape, dtype)}
    if encoded is not None:
        def body(layer, carry, _):
            return carry, layer.cross_attention.project_kv(encoded.astype(dtype))

        _, (cache["cross_key"], cache["cross_value"]) = run_stack(
            decoder_layers, jnp.zeros(()), None, body, scan=scan, remat_policy=remat_policy)
    return cache
