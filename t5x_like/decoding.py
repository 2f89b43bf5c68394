"""Autoregressive decoding of encoder-decoder models with a KV cache.

The encoder runs once; each step feeds one token through ``decode_step``, which writes its
keys/values into a fixed-shape cache, so the whole loop is one compiled ``while_loop``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.models.t5 import T5


def greedy_decode(model: T5, encoder_input_tokens: jax.Array, *, max_length: int,
                  eos_id: int = 1) -> jax.Array:
    """Argmax tokens int32 [B, max_length]; a row stops at its EOS (kept) and is 0 after it.

    The decoder starts from token 0 (not part of the output). The loop ends early once every
    row has produced EOS. Works eagerly or inside an outer ``jax.jit``.
    """
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, jnp.asarray(encoder_input_tokens, jnp.int32),
                   jnp.asarray(eos_id, jnp.int32), max_length=max_length)


@functools.partial(jax.jit, static_argnums=0, static_argnames="max_length")
def _greedy(graphdef, state, encoder_input_tokens, eos_id, *, max_length: int):
    model = nnx.merge(graphdef, state)
    batch = encoder_input_tokens.shape[0]
    encoded = model.encode(encoder_input_tokens)
    cache = model.init_cache(batch, max_length, encoded)

    def cond(carry):
        position, _, _, _, done = carry
        return (position < max_length) & ~jnp.all(done)

    def step(carry):
        position, tokens, cache, previous, done = carry
        logits, cache = model.decode_step(encoded, encoder_input_tokens, previous, cache,
                                          position)
        token = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, position))
        return position + 1, tokens, cache, token, done | (token == eos_id)

    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch, max_length), jnp.int32),
        cache,
        jnp.zeros((batch,), jnp.int32),  # decoder start token
        jnp.zeros((batch,), bool),
    )
    return jax.lax.while_loop(cond, step, init)[1]
