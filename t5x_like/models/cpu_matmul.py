"""``rows [m, k] @ kernel [k, n]`` with a weight gradient that XLA:CPU runs at matmul speed.

Autodiff's kernel gradient is ``rows^T dy``, a dot that contracts both operands' leading
axis. XLA:CPU hands that form to Eigen rather than YNNPACK, and Eigen ran it well below
YNNPACK's plain row-major product on the 2-core bench machine: for T5's MLP output projection
(4096 tokens, 1024 -> 256) 31.5 ms against 18.4 ms for transposing ``rows`` first and
multiplying, for the LM head (912 tokens, 256 -> 32128) 118 against 99 ms (same process,
9 interleaved rounds, 2026-12-04). So on one CPU device the backward transposes ``rows`` (or
``dy``, where that is narrower) and multiplies row-major; optimization barriers keep XLA's
simplifier from folding the transpose back into the dot. The T5 bench step ran 0.940x as long
(benchmarks/RESULTS.md).
Elsewhere (TPU, GPU, any multi-device step, where layout assignment chooses freely and a
barrier could disturb sharding propagation), and for mixed precision, it is the plain matmul.

Inside a rematerialised layer (``recomputed_rows``) ``rows`` is often recomputed in the backward
pass (a norm's output, the gated GELU's product), and XLA:CPU fused that recomputation into the
transposing copy, which then read its inputs down their columns: 134 ms a layer for T5's
[4096, 1024] MLP activations, and the scanned bench step ran 1.14x as long. There a barrier
first makes ``rows`` and ``dy`` buffers of their own, and the transposing copy reads them row by
row: the scanned T5 bench step (``dots`` remat) ran 0.958x as long as with autodiff's gradient,
whose token-contracting dots XLA:CPU ran outside YNNPACK (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from t5x_like.models.activation_sharding import one_device_cpu_step

_RECOMPUTED_ROWS = contextvars.ContextVar("recomputed_rows", default=False)


def recomputed_rows(fn: Callable) -> Callable:
    """``fn`` with every ``matmul`` it traces materialising its rows before its backward
    transposes them: for a rematerialised layer, whose rows the backward recomputes."""

    def traced(*args, **kwargs):
        token = _RECOMPUTED_ROWS.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _RECOMPUTED_ROWS.reset(token)

    return traced


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rows_t_gradient_matmul(rows: jax.Array, kernel: jax.Array, recomputed: bool) -> jax.Array:
    return _fwd(rows, kernel, recomputed)[0]


def _fwd(rows, kernel, recomputed):
    return jnp.dot(rows, kernel), (rows, kernel)


def _bwd(recomputed, residuals, dy):
    rows, kernel = residuals
    drows = jax.lax.dot_general(dy, kernel, (((1,), (1,)), ((), ())))
    if recomputed:
        rows, dy = jax.lax.optimization_barrier((rows, dy))
    return drows, kernel_gradient(rows, dy)


def kernel_gradient(rows: jax.Array, dy: jax.Array) -> jax.Array:
    """``rows^T dy`` [k, n], transposing whichever of ``rows`` [m, k] and ``dy`` [m, n] is
    narrower: for T5's MLP output projection (1024 -> 256) that is ``dy``, a quarter of the
    bytes. The [n, k] product is transposed back in a copy of its own: without the last
    barrier XLA fused that transpose into each of AdamW's update fusions, which then read the
    gradient down its columns (0.83 against 0.15 ms each). The others keep XLA's simplifier
    from folding a transpose into the dot."""
    if rows.shape[1] <= dy.shape[1]:
        return jnp.dot(jax.lax.optimization_barrier(rows.T), dy)
    product = jnp.dot(jax.lax.optimization_barrier(dy.T), rows)
    return jax.lax.optimization_barrier(jax.lax.optimization_barrier(product).T)


_rows_t_gradient_matmul.defvjp(_fwd, _bwd)


def rows_t_gradient_helps(rows: jax.Array, kernel: jax.Array, preferred_element_type: Any) -> bool:
    """True where the transposed-rows gradient was measured faster: XLA:CPU, one device, f32."""
    f32 = jnp.dtype(jnp.float32)
    return (one_device_cpu_step()
            and rows.dtype == f32 and kernel.dtype == f32
            and (preferred_element_type is None or jnp.dtype(preferred_element_type) == f32))


def matmul(rows: jax.Array, kernel: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """``jnp.dot(rows [m, k], kernel [k, n], preferred_element_type=...)``, same values."""
    if rows_t_gradient_helps(rows, kernel, preferred_element_type):
        return _rows_t_gradient_matmul(rows, kernel, _RECOMPUTED_ROWS.get())
    return jnp.dot(rows, kernel, preferred_element_type=preferred_element_type)
