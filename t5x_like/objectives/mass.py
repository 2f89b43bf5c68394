"""MASS: mask one contiguous fragment in the encoder, let the decoder predict it.

One sequence (int [L], ``[BOS] body [EOS] pad...`` as in ``denoising``): a fragment of
``round(fragment_ratio * m)`` body tokens (m = body length, at least one token when m > 0)
starts, as in the MASS code's ``mask_start``, at the body's beginning with probability 0.2, at
its end (the last start that fits) with probability 0.2, and at a uniformly random start
(any of the ``m - f + 1``, ends included) with probability 0.6.

Layout (static): the fragment stays at its original positions, as the MASS code does, so every
output has the input's length L and no position ids are needed:

    tokens           <s> x1 x2 x3 x4 x5 x6 </s>
    inputs           <s> x1  M  M  M x5 x6 </s>        encoder: the fragment masked
    decoder_inputs    M  M   M x2 x3  M  M  M          fragment shifted right behind one <mask>
    targets           0  0  x2 x3 x4  0  0  0          the fragment only (0 = pad)
    target_weights    0  0   1  1  1  0  0  0

Decoder positions outside the fragment hold <mask> (the paper's "other positions masked"); they
carry no information, and with causal attention the fragment sees only those before it. The
price of the static layout is a decoder of length L where the fragment is ~L/2 long; compacting
the fragment to the front would halve decoder compute but needs explicit position ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_like.errors import UserError
from t5x_like.objectives.denoising import TokenIds, below, count_of, document_body, uniform

# Probabilities of the three ways to place the fragment (MASS code: 0.2 / 0.2 / 0.6).
START_PROBS = (0.2, 0.2, 0.6)  # beginning, end, uniform


def mass_fragment(
    key: jax.Array,
    tokens: jax.Array,
    ids: TokenIds,
    *,
    fragment_ratio: float = 0.5,
    start_probs: tuple[float, float, float] = START_PROBS,
) -> dict[str, jax.Array]:
    """MASS features of one row: ``inputs``, ``decoder_inputs``, ``targets`` (int [L]),
    ``target_weights`` (float [L]) and the fragment's ``fragment_start`` (absolute position)
    and ``fragment_length`` (scalars)."""
    if not 0.0 < fragment_ratio <= 1.0:
        raise UserError(f"fragment_ratio must lie in (0, 1], got {fragment_ratio}.")
    if len(start_probs) != 3 or min(start_probs) < 0 or abs(sum(start_probs) - 1.0) > 1e-6:
        raise UserError(
            f"start_probs must be three non-negative probabilities (beginning, end, uniform) "
            f"summing to 1, got {start_probs}."
        )
    n = tokens.shape[0]
    tokens = tokens.astype(jnp.int32)
    pos = jnp.arange(n, dtype=jnp.int32)
    bits = jax.random.bits(key, (2,), jnp.uint32)
    start, end = document_body(tokens, ids)
    m = end - start
    length = jnp.where(m > 0, jnp.clip(count_of(fragment_ratio, m), 1, m), 0)
    last = m - length  # the last offset at which the fragment still fits
    u = uniform(bits[0])
    p_begin, p_end, _ = start_probs
    anywhere = below(bits[1], last + 1)
    offset = jnp.where(u < p_begin, 0, jnp.where(u < p_begin + p_end, last, anywhere))
    first = start + offset

    inside = (pos >= first) & (pos < first + length)
    previous = jnp.concatenate([jnp.full((1,), ids.mask, jnp.int32), tokens[:-1]])
    starts_fragment = pos == first
    return {
        "inputs": jnp.where(inside, ids.mask, tokens),
        "decoder_inputs": jnp.where(inside & ~starts_fragment, previous, ids.mask),
        "targets": jnp.where(inside, tokens, ids.pad),
        "target_weights": inside.astype(jnp.float32),
        "fragment_start": first,
        "fragment_length": length,
    }
