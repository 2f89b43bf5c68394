"""Float32 logits through an untied output projection [embed, vocab] (T5 1.1's LM head).

The kernel's gradient is ``x^T dlogits``: [embed, vocab], contracted over the tokens. On
XLA:CPU, YNNPACK ran that orientation of T5's LM head (912 tokens x 256 x 32128) at
109 GFLOP/s against 175 for the transposed product ``dlogits^T x`` [vocab, embed] on the
2-core bench machine (120 vs 86 ms, 2026-12-03), so on one CPU device the backward computes
[vocab, embed] and transposes it (33 MB). An optimization barrier keeps XLA's simplifier from
folding the transpose back into the matmul, and a second one makes the transpose a pass of its
own: without it XLA fused the transpose into the optimizer's elementwise updates, which then
read the gradient down its columns, three times (AdamW's moments and the parameter; 127 ms a
step on the T5 bench config against ~10 ms for the same updates of the [vocab, embed] token
embedding). With it the step ran 0.978x as long (5 interleaved rounds in one process,
2026-12-04, all five faster). Elsewhere (TPU, GPU, any multi-device step, where
layout assignment chooses freely and the barrier could disturb sharding propagation) this is
the plain matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_like.models.activation_sharding import step_devices


def _plain(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.dot(rows, kernel, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _cpu_logits(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    return _plain(rows, kernel)


def _cpu_logits_fwd(rows, kernel):
    return _plain(rows, kernel), (rows, kernel)


def _cpu_logits_bwd(residuals, dlogits):
    rows, kernel = residuals
    contract_vocab = (((1,), (1,)), ((), ()))
    contract_tokens = (((0,), (0,)), ((), ()))
    drows = jax.lax.dot_general(dlogits, kernel.astype(dlogits.dtype), contract_vocab)
    dkernel_t = jax.lax.dot_general(dlogits, rows.astype(dlogits.dtype), contract_tokens)
    dkernel = jax.lax.optimization_barrier(jax.lax.optimization_barrier(dkernel_t).T)
    return drows.astype(rows.dtype), dkernel.astype(kernel.dtype)


_cpu_logits.defvjp(_cpu_logits_fwd, _cpu_logits_bwd)


def transposed_gradient_helps() -> bool:
    """True where the [vocab, embed] gradient was measured faster: XLA:CPU, one device."""
    return jax.default_backend() == "cpu" and step_devices() == 1


def vocab_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Float32 ``x [..., embed] @ kernel [embed, vocab] -> [..., vocab]``."""
    rows = x.reshape(-1, x.shape[-1])
    matmul = _cpu_logits if transposed_gradient_helps() else _plain
    return matmul(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])
