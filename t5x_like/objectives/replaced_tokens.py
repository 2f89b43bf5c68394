"""ELECTRA's replaced-token detection: the generator's samples make the discriminator's input.

The generator sees ``masking.mask(key, tokens, electra_masking(...))`` and produces logits at
the selected positions (``positions`` / ``position_weights``, [P, V]). Here one token is
sampled per selected position with the Gumbel-max trick on the stop-gradient logits (no
gradient reaches the generator through the samples, as in the paper), written over the
original sequence at every selected position, and each non-padding token labelled 1 when it
differs from the original. A sample that equals the original counts as original (label 0):
the discriminator cannot tell it apart, and ELECTRA's labels say so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_like.errors import UserError

PAD_ID = 0


def sample_replacements(key: jax.Array, tokens: jax.Array, positions: jax.Array,
                        position_weights: jax.Array, generator_logits: jax.Array,
                        temperature: float = 1.0) -> dict[str, jax.Array]:
    """Discriminator input and labels for one sequence.

    ``tokens``: the original ids, int [L] (0 = padding). ``positions`` / ``position_weights``:
    the selected slots [P] from ``mask``. ``generator_logits``: float [P, V] at those slots.
    Returns ``inputs`` int32 [L] (originals with the samples written in), ``labels`` f32 [L]
    (1 = replaced), ``weights`` f32 [L] (1 on every non-padding token: the discriminator loss
    covers them all) and ``sampled`` int32 [P] (the generator's tokens, for its metrics).
    """
    if generator_logits.ndim != 2 or generator_logits.shape[0] != positions.shape[0]:
        raise UserError(f"generator_logits must be [{positions.shape[0]}, vocab] (one row per "
                        f"prediction slot), got shape {generator_logits.shape}.")
    if temperature <= 0:
        raise UserError(f"sampling temperature must be positive, got {temperature}.")
    tokens = tokens.astype(jnp.int32)
    length = tokens.shape[0]
    logits = jax.lax.stop_gradient(generator_logits).astype(jnp.float32) / temperature
    gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
    sampled = jnp.argmax(logits + gumbel, axis=-1).astype(jnp.int32)
    slots = jnp.where(position_weights > 0, positions, length)  # empty slots write nothing
    inputs = tokens.at[slots].set(sampled, mode="drop")
    real = tokens != PAD_ID
    return {
        "inputs": inputs,
        "labels": ((inputs != tokens) & real).astype(jnp.float32),
        "weights": real.astype(jnp.float32),
        "sampled": sampled,
    }
