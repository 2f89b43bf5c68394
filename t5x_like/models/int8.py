"""Symmetric 8-bit arithmetic a layer can run in: fake quantization and int8 matmuls.

A tensor with range ``r`` (max|x|) maps onto the int8 grid with scale ``s = 127 / r``:
``q = clip(round(x * s), -127, 127)``, read back as ``q / s``. These are pure ``jnp``
functions with no state; ``compress/quantize.py`` decides when a model runs in them (and
keeps the activation ranges), the encoder's layers only call them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = 127.0
_TINY = 1e-12  # an all-zero tensor gets this range (its values quantize to 0 exactly)


def scale_of(max_abs: jax.Array) -> jax.Array:
    """``127 / max|x|``: the factor that maps the range onto the int8 grid."""
    return QMAX / jnp.maximum(max_abs, _TINY)


def active_range(stored: jax.Array, batch_max: jax.Array) -> jax.Array:
    """The range an activation is quantized with: the stored EMA, or (before the first update,
    stored = 0) the current batch's max. Never differentiated."""
    return jax.lax.stop_gradient(jnp.where(stored > 0, stored, batch_max))


def fake_quant(x: jax.Array, max_abs: jax.Array) -> jax.Array:
    """``q(x) / s`` in the forward pass; gradient 1 for |x| <= max_abs, 0 where x was clipped."""
    max_abs = jax.lax.stop_gradient(jnp.maximum(max_abs, _TINY))
    clipped = jnp.where(jnp.abs(x) <= max_abs, x, jnp.sign(x) * max_abs)
    s = scale_of(max_abs)
    grid = jnp.clip(jnp.round(clipped * s), -QMAX, QMAX) / s
    return clipped + jax.lax.stop_gradient(grid - clipped)


def fake_quant_weight(w: jax.Array) -> jax.Array:
    """A weight fake-quantized with its own max (per tensor)."""
    return fake_quant(w, jnp.max(jnp.abs(w)))


def quantize_int8(x: jax.Array, max_abs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scale) with ``x ~= q / scale``."""
    s = scale_of(max_abs)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) * s), -QMAX, QMAX).astype(jnp.int8)
    return q, s.astype(jnp.float32)


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) / scale


def int8_tensordot(x: jax.Array, x_range: jax.Array, kernel: jax.Array, kernel_scale: jax.Array,
                   num_in: int) -> jax.Array:
    """``x @ kernel`` over x's last ``num_in`` dims with x quantized to int8 by ``x_range``,
    the int8 ``kernel`` as stored, int32 accumulation, one float32 rescale at the end."""
    qx, sx = quantize_int8(x, x_range)
    dims = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
    acc = jax.lax.dot_general(qx, kernel, (dims, ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) / (sx * kernel_scale)
