"""Parameter-efficient fine-tuning: LoRA, adapters, prompt tuning, prefix tuning.

The pretrained modules are never edited. LoRA lives in parameter space: a target kernel W
becomes ``W + (alpha / r) * A @ B`` before the model is merged, which is the same function as
a parallel low-rank path (Hu et al.) and starts as the identity change (B = 0). The other
three methods are installed on a merged model by replacing sub-modules with wrappers:

- adapters (Houlsby et al.): ``y + up(gelu(down(y)))`` on the output of each attention and
  feed-forward sub-layer, before its residual add; ``up`` starts at zero (identity);
- prefix tuning (Li & Liang): P trainable key/value rows in front of each attention's keys
  (encoder self-attention; cross-attention in a decoder, which keeps the KV cache valid),
  produced during training by an MLP from P embeddings (the reparametrisation) and exported
  as plain tensors (``export_prefix``), the MLP dropped;
- prompt tuning (Lester et al.): P trainable input embeddings in place of P placeholder
  tokens at the front of the encoder input (after [CLS] in a BERT-style encoder).

Trainable tensors are kept in flat dicts keyed by the target's parameter path joined with
``__`` (orbax-safe names). Per-layer tensors are stacked on a leading ``layers`` axis, which
``layers.run_stack`` slices in scanned stacks and ``_layer`` slices for unrolled ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models import layers as L

SEP = "__"


def key_of(path: tuple) -> str:
    return SEP.join(str(p) for p in path)


def leaves_with_paths(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) of a nested dict in insertion order."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from leaves_with_paths(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def get_path(tree: Mapping, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def replace_path(tree: Mapping, path: tuple, value: Any) -> dict:
    """A copy of ``tree`` with the leaf at ``path`` replaced (only the dicts on the way copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else replace_path(tree[path[0]], path[1:], value)
    return out


# --------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Arch:
    """Where a module family keeps what PEFT touches (attribute names inside one layer)."""

    stacks: tuple[str, ...]  # top-level attributes holding a ``layers`` stack, bottom first
    adapter_sites: Mapping[str, tuple[str, ...]]  # stack -> dotted sub-modules to wrap
    prefix_sites: Mapping[str, str]  # stack -> attention module given prefixes
    prompt: str  # "t5" | "encoder" | "" (not supported)


ARCHS = {
    "T5": Arch(("encoder", "decoder"),
               {"encoder": ("attention", "mlp"), "decoder": ("self_attention", "mlp")},
               {"encoder": "attention", "decoder": "cross_attention"}, "t5"),
    "Bart": Arch(("encoder", "decoder"),
                 {"encoder": ("self_attention", "mlp"), "decoder": ("self_attention", "mlp")},
                 {"encoder": "self_attention", "decoder": "cross_attention"}, ""),
    "EncoderModel": Arch(("encoder",), {"encoder": ("attention.out", "ffn.wo")},
                         {"encoder": "attention"}, "encoder"),
}


def arch_of(module_class: type) -> Arch:
    if module_class.__name__ not in ARCHS:
        raise UserError(f"parameter-efficient fine-tuning does not know {module_class.__name__}; "
                        f"it supports {sorted(ARCHS)}")
    return ARCHS[module_class.__name__]


@dataclasses.dataclass(frozen=True)
class Dims:
    d_model: int
    num_heads: int
    d_kv: int
    layers: Mapping[str, int]  # stack -> distinct layer parameter sets


def dims_of(model_config) -> Dims:
    c = model_config
    if hasattr(c, "hidden_size"):  # EncoderConfig
        return Dims(c.hidden_size, c.num_heads, c.hidden_size // c.num_heads,
                    {"encoder": c.units})
    return Dims(c.d_model, c.num_heads, c.d_kv,
                {"encoder": c.num_encoder_layers, "decoder": c.num_decoder_layers})


# --------------------------------------------------------------------------- LoRA


def lora_targets(logical: Mapping, shapes: Mapping, names: tuple[str, ...]) -> list[tuple]:
    """Paths of the kernels LoRA adapts: a path component in ``names``, not a bias, >= 2-D."""
    found = []
    for path, spec in leaves_with_paths(logical):
        core = [n for n in spec if n != "layers"]
        last = str(path[-1])
        if (any(str(p) in names for p in path) and "bias" not in last and "norm" not in last
                and len(core) >= 2 and "embeddings" not in key_of(path)):
            found.append(path)
    if not found:
        raise UserError(f"finetune.lora_targets={names} matches no kernel of this model; name "
                        "sub-modules such as 'query', 'value', 'key', 'out', 'wi', 'wo'")
    return found


def _lora_split(spec: tuple) -> tuple[int, int]:
    """(leading stacked dims, index in the core dims where output dims start)."""
    lead = 1 if spec and spec[0] == "layers" else 0
    core = spec[lead:]
    return lead, 1 if core[0] == "embed" else len(core) - 1


class LoRA(nnx.Module):
    """A [in..., r] and B [r, out...] per target kernel; A ~ N(0, 1/in), B = 0."""

    def __init__(self, logical: Mapping, shapes: Mapping, targets: list[tuple], rank: int, *,
                 rngs: nnx.Rngs):
        a, b = {}, {}
        for path in targets:
            spec, shape = tuple(get_path(logical, path)), tuple(get_path(shapes, path).shape)
            spec = spec + (None,) * (len(shape) - len(spec))
            lead, split = _lora_split(spec)
            ins, outs = shape[lead:lead + split], shape[lead + split:]
            std = math.prod(ins) ** -0.5
            a[key_of(path)] = L.make_param(rngs, L.normal(std), (*shape[:lead], *ins, rank),
                                           (*spec[:lead + split], None), jnp.float32)
            b[key_of(path)] = L.make_param(rngs, jax.nn.initializers.zeros,
                                           (*shape[:lead], rank, *outs),
                                           (*spec[:lead], None, *spec[lead + split:]), jnp.float32)
        self.a, self.b = nnx.Dict(a), nnx.Dict(b)


def lora_delta(a: jax.Array, b: jax.Array, shape: tuple, lead: int, scale: float) -> jax.Array:
    """scale * A @ B reshaped to the kernel's shape (per stacked layer when ``lead``)."""
    am = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    bm = b.reshape(*b.shape[:lead], b.shape[lead], -1)
    return (scale * jnp.matmul(am, bm)).reshape(shape)


def apply_lora(model_params: dict, lora: Mapping, logical: Mapping, targets: list[tuple],
               scale: float) -> dict:
    """Model parameters with every target W replaced by W + scale * A @ B."""
    for path in targets:
        w = get_path(model_params, path)
        lead, _ = _lora_split(tuple(get_path(logical, path)))
        k = key_of(path)
        delta = lora_delta(lora["a"][k], lora["b"][k], w.shape, lead, scale)
        model_params = replace_path(model_params, path, (w + delta).astype(w.dtype))
    return model_params


# --------------------------------------------------------------------------- adapters


def _site_key(stack: str, site: str) -> str:
    return key_of((stack, *site.split(".")))


class Adapters(nnx.Module):
    """down [layers, d, m] (std 1e-2) + bias, up [layers, m, d] (zeros) + bias, per site."""

    def __init__(self, arch: Arch, dims: Dims, size: int, *, rngs: nnx.Rngs):
        params = {}
        d = dims.d_model
        for stack, sites in arch.adapter_sites.items():
            n = dims.layers[stack]
            for site in sites:
                k = _site_key(stack, site)
                zeros = jax.nn.initializers.zeros
                params[f"{k}{SEP}down"] = L.make_param(rngs, L.normal(1e-2), (n, d, size),
                                                       ("layers", "embed", None), jnp.float32)
                params[f"{k}{SEP}down_bias"] = L.make_param(rngs, zeros, (n, size),
                                                            ("layers", None), jnp.float32)
                params[f"{k}{SEP}up"] = L.make_param(rngs, zeros, (n, size, d),
                                                     ("layers", None, "embed"), jnp.float32)
                params[f"{k}{SEP}up_bias"] = L.make_param(rngs, zeros, (n, d),
                                                          ("layers", "embed"), jnp.float32)
        self.params = nnx.Dict(params)


class Adapted(nnx.Module):
    """A sub-layer followed by a bottleneck adapter: ``y + up(gelu(down(y) + b) ) + b'``."""

    def __init__(self, inner: nnx.Module, down, down_bias, up, up_bias):
        self.inner = inner
        self.down, self.down_bias = nnx.Param(down), nnx.Param(down_bias)
        self.up, self.up_bias = nnx.Param(up), nnx.Param(up_bias)

    def _adapt(self, y: jax.Array) -> jax.Array:
        h = jax.nn.gelu(jnp.einsum("...d,dm->...m", y.astype(jnp.float32), self.down[...])
                        + self.down_bias[...])
        h = jnp.einsum("...m,md->...d", h, self.up[...]) + self.up_bias[...]
        return y + h.astype(y.dtype)

    def __call__(self, *args, **kwargs):
        return self._adapt(self.inner(*args, **kwargs))

    def attend(self, *args, **kwargs):  # BART's attention output
        return self._adapt(self.inner.attend(*args, **kwargs))

    def project_kv(self, x):
        return self.inner.project_kv(x)

    def project_q(self, x):
        return self.inner.project_q(x)


# --------------------------------------------------------------------------- prefix tuning


class Prefix(nnx.Module):
    """Li & Liang's reparametrised prefix: P embeddings -> MLP -> keys and values per layer.

    ``embedding`` [P, d], ``w1`` [d, hidden] + bias, then per stack ``<stack>__w2`` [hidden,
    layers, 2, heads, d_kv] + bias; after ``export_prefix`` the dict holds ``<stack>__keys`` /
    ``<stack>__values`` [layers, P, heads, d_kv] instead.
    """

    def __init__(self, arch: Arch, dims: Dims, length: int, hidden: int, *, rngs: nnx.Rngs):
        d, h, kv = dims.d_model, dims.num_heads, dims.d_kv
        zeros = jax.nn.initializers.zeros
        p = {"embedding": L.make_param(rngs, L.normal(1.0), (length, d), (None, "embed"),
                                       jnp.float32),
             "w1": L.make_param(rngs, L.normal(d ** -0.5), (d, hidden), ("embed", "mlp"),
                                jnp.float32),
             "b1": L.make_param(rngs, zeros, (hidden,), ("mlp",), jnp.float32)}
        for stack in arch.prefix_sites:
            n = dims.layers[stack]
            p[f"{stack}{SEP}w2"] = L.make_param(
                rngs, L.normal(hidden ** -0.5), (hidden, n, 2, h, kv),
                ("mlp", "layers", None, "heads", "kv"), jnp.float32)
            p[f"{stack}{SEP}b2"] = L.make_param(rngs, zeros, (n, 2, h, kv),
                                                ("layers", None, "heads", "kv"), jnp.float32)
        self.params = nnx.Dict(p)


def prefix_kv(prefix: Mapping, stack: str) -> tuple[jax.Array, jax.Array]:
    """Keys and values [layers, P, heads, d_kv] of one stack, from either form."""
    if f"{stack}{SEP}keys" in prefix:
        return prefix[f"{stack}{SEP}keys"], prefix[f"{stack}{SEP}values"]
    h = jnp.tanh(prefix["embedding"] @ prefix["w1"] + prefix["b1"])  # [P, hidden]
    kv = jnp.einsum("ph,hlsnd->slpnd", h, prefix[f"{stack}{SEP}w2"])
    kv = kv + jnp.moveaxis(prefix[f"{stack}{SEP}b2"], 1, 0)[:, :, None]
    return kv[0], kv[1]


def export_prefix(prefix: Mapping, arch: Arch) -> dict:
    """The prefix as plain key/value tensors: the reparametrisation MLP is dropped."""
    out = {}
    for stack in arch.prefix_sites:
        out[f"{stack}{SEP}keys"], out[f"{stack}{SEP}values"] = prefix_kv(prefix, stack)
    return out


def _pad_front(x: jax.Array | None, length: int, value) -> jax.Array | None:
    """Pads the last axis of a mask or bias by ``length`` entries in front."""
    if x is None:
        return None
    pad = jnp.full((*x.shape[:-1], length), value, x.dtype)
    return jnp.concatenate([pad, x], axis=-1)


def _with_prefix(prefix: jax.Array, x: jax.Array) -> jax.Array:
    """[P, heads, d] in front of [B, S, heads, d] along S."""
    rows = jnp.broadcast_to(prefix.astype(x.dtype)[None], (x.shape[0], *prefix.shape))
    return jnp.concatenate([rows, x], axis=1)


class PrefixAttention(nnx.Module):
    """T5/BART attention whose keys and values start with P trainable rows (zero position
    bias, never masked)."""

    def __init__(self, inner: nnx.Module, keys, values):
        self.inner = inner
        self.prefix_keys, self.prefix_values = nnx.Param(keys), nnx.Param(values)

    def project_kv(self, x):
        k, v = self.inner.project_kv(x)
        return _with_prefix(self.prefix_keys[...], k), _with_prefix(self.prefix_values[...], v)

    def project_q(self, x):
        return self.inner.project_q(x)

    def _length(self) -> int:
        return self.prefix_keys.shape[-3]

    def __call__(self, x, k, v, *, bias, mask, dropout_key=None):
        n = self._length()
        return self.inner(x, k, v, bias=_pad_front(bias, n, 0), mask=_pad_front(mask, n, True),
                          dropout_key=dropout_key)

    def attend(self, q, k, v, *, mask, dropout_key=None):
        return self.inner.attend(q, k, v, mask=_pad_front(mask, self._length(), True),
                                 dropout_key=dropout_key)


class PrefixDense(nnx.Module):
    """A BERT key/value projection whose output starts with P trainable rows."""

    def __init__(self, inner: nnx.Module, rows):
        self.inner = inner
        self.rows = nnx.Param(rows)

    def __call__(self, x):
        return _with_prefix(self.rows[...], self.inner(x))


class MaskPadded(nnx.Module):
    """A BERT self-attention whose padding mask admits the P prefix rows."""

    def __init__(self, inner: nnx.Module, length: int):
        self.inner = inner
        self.length = length

    def __call__(self, x, mask, *args, **kwargs):
        return self.inner(x, _pad_front(mask, self.length, True), *args, **kwargs)


# --------------------------------------------------------------------------- prompt tuning


class Prompt(nnx.Module):
    """P soft token embeddings [P, d] (sampled like the vocabulary's rows)."""

    def __init__(self, dims: Dims, length: int, std: float, *, rngs: nnx.Rngs):
        self.embeddings = L.make_param(rngs, L.normal(std), (length, dims.d_model),
                                       (None, "embed"), jnp.float32)


class PromptedEmbed(nnx.Module):
    """An embedder whose output rows ``start .. start + P`` are the prompt, while ``active``
    (T5 shares its embedder with the decoder, which must not see the prompt)."""

    def __init__(self, inner: nnx.Module, prompt, start: int):
        self.inner = inner
        self.prompt = nnx.Param(prompt)
        self.start = start
        self.active = False

    def __call__(self, *args, **kwargs):
        x = self.inner(*args, **kwargs)
        if not self.active:
            return x
        p, s = self.prompt[...], self.start
        rows = jnp.broadcast_to(p.astype(x.dtype)[None], (x.shape[0], *p.shape))
        return jnp.concatenate([x[:, :s], rows, x[:, s + p.shape[0]:]], axis=1)

    def attend(self, *args, **kwargs):
        return self.inner.attend(*args, **kwargs)


# --------------------------------------------------------------------------- installation


def _layer(stacked: jax.Array, i: int | None) -> jax.Array:
    return stacked if i is None else stacked[i]


def _stack_layers(model: nnx.Module, stack: str, scan: bool) -> list[tuple[nnx.Module, Any]]:
    """(layer module, index into stacked PEFT tensors or None for a scanned stack)."""
    layers = getattr(model, stack).layers
    return [(layers, None)] if scan else [(layer, i) for i, layer in enumerate(layers)]


def _swap(owner: nnx.Module, dotted: str, make) -> None:
    *parents, name = dotted.split(".")
    for p in parents:
        owner = getattr(owner, p)
    setattr(owner, name, make(getattr(owner, name)))


def install_adapters(model: nnx.Module, arch: Arch, params: Mapping, scan: bool) -> None:
    for stack, sites in arch.adapter_sites.items():
        for layer, i in _stack_layers(model, stack, scan):
            for site in sites:
                k = _site_key(stack, site)
                parts = [_layer(params[f"{k}{SEP}{n}"], i)
                         for n in ("down", "down_bias", "up", "up_bias")]
                _swap(layer, site, lambda inner, parts=parts: Adapted(inner, *parts))


def install_prefix(model: nnx.Module, arch: Arch, params: Mapping, scan: bool) -> None:
    for stack, site in arch.prefix_sites.items():
        keys, values = prefix_kv(params, stack)
        for layer, i in _stack_layers(model, stack, scan):
            k, v = _layer(keys, i), _layer(values, i)
            if arch.prompt == "encoder":  # BERT-style: wrap the projections, pad the mask
                attention = getattr(layer, site)
                attention.key = PrefixDense(attention.key, k)
                attention.value = PrefixDense(attention.value, v)
                setattr(layer, site, MaskPadded(attention, keys.shape[-3]))
            else:
                _swap(layer, site, lambda inner, k=k, v=v: PrefixAttention(inner, k, v))


def install_prompt(model: nnx.Module, arch: Arch, prompt: jax.Array) -> PromptedEmbed:
    """Wraps the embedder; the caller sets ``active`` around the encoder call (T5)."""
    if arch.prompt == "t5":
        model.token_embedder = PromptedEmbed(model.token_embedder, prompt, 0)
        return model.token_embedder
    if arch.prompt == "encoder":
        model.embeddings = PromptedEmbed(model.embeddings, prompt, 1)
        model.embeddings.active = True
        return model.embeddings
    raise UserError("prompt tuning supports T5 and BERT-style encoders, not this model")
