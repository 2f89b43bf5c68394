"""Losses as sums with their weights, so that any split of a batch (devices, micro-batches)
adds up to the same mean: the trainer divides by the total weight once, at the end."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_with_z_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
    """Token cross-entropy plus T5's z-loss ``z_loss * logsumexp(logits)**2``, as weighted sums.

    Returns sums over all positions: ``loss`` (CE + z-loss, what is differentiated),
    ``cross_entropy``, ``z_loss``, ``correct`` (hits: the target's logit is the largest) and
    ``weight`` (number of scored tokens). Computed in float32 whatever the logits' dtype.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    # One max over the vocabulary serves both the stable logsumexp and the accuracy (the
    # target is a hit when its logit is the largest): no separate argmax pass.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - target_logit  # no [batch, length, vocab] log-probabilities materialised
    if label_smoothing:
        vocab = logits.shape[-1]
        on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        mean_log_prob = jnp.mean(logits, axis=-1) - log_z
        # -sum(soft * log p) = on*ce + off*(sum_v -log p_v - ce), minus the soft target's
        # entropy so that a perfect model scores 0.
        ce = (on - off) * ce - off * vocab * mean_log_prob
        ce -= -(on * jnp.log(on) + (vocab - 1) * off * jnp.log(off + 1e-20))
    z = z_loss * jnp.square(log_z) if z_loss else jnp.zeros_like(log_z)
    correct = (target_logit >= top).astype(jnp.float32)
    return {
        "loss": jnp.sum((ce + z) * weights),
        "cross_entropy": jnp.sum(ce * weights),
        "z_loss": jnp.sum(z * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
    }
