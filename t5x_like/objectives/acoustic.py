"""Masked acoustic modelling (Mockingjay, Liu et al. 2020): mask spans of consecutive frames,
reconstruct them, L1 loss on the selected frames only.

Every valid position starts a span of ``span`` positions with probability
``1 - (1 - mask_ratio) ** (1 / span)``, so that a position is covered with probability
``mask_ratio`` away from the edges (overlapping spans merge). Each span (as its starting
position decides) is replaced by zeros with probability ``zero_prob``, by frames from random
positions of the same utterance with ``random_prob``, and left unchanged otherwise
(Mockingjay: 80 / 10 / 10). Padding is never selected and never a replacement.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AcousticMasking:
    mask_ratio: float = 0.15
    span: int = 7
    zero_prob: float = 0.8
    random_prob: float = 0.1

    @property
    def start_prob(self) -> float:
        return 1.0 - (1.0 - self.mask_ratio) ** (1.0 / self.span)


def mask_frames(frames: jax.Array, valid: jax.Array, key: jax.Array,
                m: AcousticMasking) -> dict[str, jax.Array]:
    """``frames`` [B, T, D], ``valid`` [B, T] -> ``inputs`` (the corrupted frames),
    ``selected`` [B, T] (positions the loss reads) and ``starts`` [B, T] (span starts)."""
    k_start, k_action, k_source = jax.random.split(key, 3)
    b, t = valid.shape
    valid = valid.astype(bool)
    starts = jax.random.bernoulli(k_start, m.start_prob, (b, t)) & valid
    index = jnp.arange(t)[None, :]
    last = jax.lax.cummax(jnp.where(starts, index, -1), axis=1)  # latest start at or before
    selected = (last >= 0) & (index - last < m.span) & valid
    u = jax.random.uniform(k_action, (b, t))
    action = jnp.take_along_axis(u, jnp.maximum(last, 0), axis=1)  # the span's own draw
    zero = selected & (action < m.zero_prob)
    rand = selected & (action >= m.zero_prob) & (action < m.zero_prob + m.random_prob)
    lengths = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
    source = jnp.floor(jax.random.uniform(k_source, (b, t)) * lengths).astype(jnp.int32)
    random_frames = jnp.take_along_axis(frames, source[..., None], axis=1)
    inputs = jnp.where(zero[..., None], 0.0, jnp.where(rand[..., None], random_frames, frames))
    return {"inputs": inputs.astype(frames.dtype), "selected": selected, "starts": starts}


def l1_sums(prediction: jax.Array, target: jax.Array, selected: jax.Array,
            valid: jax.Array) -> dict:
    """Summed |prediction - target| over the selected positions and every feature, with its
    weight (selected positions x features): the loss is the mean absolute error per value.
    ``mask/selected`` over ``mask/weight`` is the fraction of valid positions selected."""
    w = selected.astype(jnp.float32)[..., None]
    total = jnp.sum(jnp.abs(prediction.astype(jnp.float32) - target.astype(jnp.float32)) * w)
    return {"loss": total, "l1": total, "weight": jnp.sum(w) * prediction.shape[-1],
            "mask/selected": jnp.sum(w), "mask/weight": jnp.sum(valid.astype(jnp.float32))}
