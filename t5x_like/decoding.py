"""Autoregressive decoding with a KV cache: greedy, temperature / top-k / top-p sampling and
beam search (``beam_search.py``), for encoder-decoders and decoder-only LMs alike.

Every model is first seen as a ``Stepper``: ``step(token_ids [N], cache, position) -> (logits
[N, vocab], cache)`` over a fixed-shape cache for N rows, plus the token fed first and where it
goes. The search loops are written once against that; ``encoder_decoder`` (T5, BART: the
encoder runs once, the decoder starts from its start token at position 0) and ``decoder_lm``
(the prompt is prefilled, its last token is fed first) build it. Each loop is one compiled
``lax.while_loop`` with static shapes that exits once every row is done.

Outputs follow ``transformers``' ``generate``: greedy and beam search give the same tokens on
the same weights (tests/test_decoding.py); sampling warps logits in its order (temperature,
then top-k, then top-p). Generated tokens are [rows, max_length] int32, EOS kept, ``pad_id``
after it; the start token or prompt is not part of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like import beam_search as beam
from t5x_like.errors import UserError
from t5x_like.stepper import Options, StepFn, Stepper  # noqa: F401  re-exported


def encoder_decoder(model: Any, encoder_input_tokens: jax.Array, *, max_length: int,
                    start_id: int, repeat: int = 1) -> Stepper:
    """T5 / BART: encode once, repeat each row ``repeat`` times, start from ``start_id``."""
    encoded = jnp.repeat(model.encode(encoder_input_tokens), repeat, axis=0)
    tokens = jnp.repeat(encoder_input_tokens, repeat, axis=0)
    rows = tokens.shape[0]

    def step(token_ids, cache, position):
        return model.decode_step(encoded, tokens, token_ids, cache, position)

    return Stepper(step, model.init_cache(rows, max_length, encoded),
                   {"self_key": 1, "self_value": 1}, jnp.full((rows,), start_id, jnp.int32), 0)


def decoder_lm(model: Any, prompts: jax.Array, valid: jax.Array, *, max_length: int,
               repeat: int = 1) -> Stepper:
    """A decoder LM on prompts [B, T] (``valid`` marks real tokens, each row needs one): padding
    is moved to the left, all but the last slot are prefilled, the last token is fed first."""
    order = jnp.argsort(valid, axis=1, stable=True)  # padding first, real tokens in order
    prompts = jnp.repeat(jnp.take_along_axis(prompts, order, axis=1), repeat, axis=0)
    valid = jnp.repeat(jnp.take_along_axis(valid, order, axis=1), repeat, axis=0)
    rows, length = prompts.shape
    cache = model.init_cache(rows, length - 1 + max_length)
    if length > 1:
        _, cache = model.prefill(prompts[:, :-1], cache, valid=valid[:, :-1])
    return Stepper(model.decode_step, cache, {"key": 1, "value": 1}, prompts[:, -1],
                   length - 1)


# ----------------------------------------------------------------------------- sampling
def warp_logits(logits: jax.Array, *, temperature: float, top_k: int = 0,
                top_p: float = 1.0) -> jax.Array:
    """Logits / temperature, then everything below the k-th largest to -inf, then everything
    outside the smallest top set holding probability >= top_p (transformers' order)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ascending = jnp.sort(logits, axis=-1)
        mass_at_or_below = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        dropped = mass_at_or_below <= 1.0 - top_p
        dropped = dropped.at[..., -1].set(False)  # the top token always stays
        smallest_kept = jnp.min(jnp.where(dropped, jnp.inf, ascending), axis=-1, keepdims=True)
        logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
    return logits


def _token_loop(s: Stepper, choose: Callable[[jax.Array, jax.Array], jax.Array], *,
                max_length: int, eos_id: int, pad_id: int) -> jax.Array:
    """Tokens [N, max_length] from ``choose(logits, step)``; a row is ``pad_id`` after its EOS
    and the loop ends once every row has one."""
    rows = s.first_tokens.shape[0]

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_length) & ~jnp.all(done)

    def body(carry):
        i, tokens, cache, previous, done = carry
        logits, cache = s.step(previous, cache, s.first_position + i)
        token = jnp.where(done, pad_id, choose(logits, i).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        return i + 1, tokens, cache, token, done | (token == eos_id)

    init = (jnp.zeros((), jnp.int32), jnp.full((rows, max_length), pad_id, jnp.int32), s.cache,
            s.first_tokens.astype(jnp.int32), jnp.zeros((rows,), bool))
    return jax.lax.while_loop(cond, body, init)[1]


def greedy(s: Stepper, *, max_length: int, eos_id: int, pad_id: int = 0) -> jax.Array:
    """Argmax tokens [N, max_length]."""
    return _token_loop(s, lambda logits, _: jnp.argmax(logits, axis=-1), max_length=max_length,
                       eos_id=eos_id, pad_id=pad_id)


def sample(s: Stepper, key: jax.Array, options: Options, *, max_length: int, eos_id: int,
           pad_id: int = 0) -> jax.Array:
    """Sampled tokens [N, max_length]; step i draws with ``fold_in(key, i)``, so a key fixes
    the output."""
    def choose(logits, i):
        warped = warp_logits(logits, temperature=options.temperature, top_k=options.top_k,
                             top_p=options.top_p)
        return jax.random.categorical(jax.random.fold_in(key, i), warped, axis=-1)

    return _token_loop(s, choose, max_length=max_length, eos_id=eos_id, pad_id=pad_id)


# ----------------------------------------------------------------------------- entry point
def generate(model: Any, inputs: jax.Array, *, max_length: int, eos_id: int,
             options: Options = Options(), key: jax.Array | None = None, pad_id: int = 0,  # noqa: B008
             start_id: int = 0, valid: jax.Array | None = None) -> jax.Array:
    """Generated tokens [B * num_return_sequences, max_length] int32 (row b * R + r).

    ``model`` is an encoder-decoder (has ``encode``; ``inputs`` are encoder tokens, decoding
    starts from ``start_id``) or a decoder LM (``inputs`` are prompts; ``valid`` marks their
    real tokens, default ``inputs != pad_id``; left or right padding). Sampling needs ``key``.
    Works eagerly or inside an outer ``jax.jit``.
    """
    if options.sampling and key is None:
        raise UserError("sampling (temperature > 0) needs a random key (--seed)")
    inputs = jnp.asarray(inputs, jnp.int32)
    valid = inputs != pad_id if valid is None else jnp.asarray(valid, bool)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, inputs, valid, key, options=options,
                     max_length=max_length, ids=(eos_id, pad_id, start_id))


def greedy_decode(model: Any, encoder_input_tokens: jax.Array, *, max_length: int,
                  eos_id: int = 1, start_id: int = 0) -> jax.Array:
    """Argmax tokens [B, max_length] of an encoder-decoder; EOS kept, 0 after it."""
    return generate(model, encoder_input_tokens, max_length=max_length, eos_id=eos_id,
                    start_id=start_id)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("options", "max_length", "ids"))
def _generate(graphdef, state, inputs, valid, key, *, options: Options, max_length: int,
              ids: tuple[int, int, int]) -> jax.Array:
    eos_id, pad_id, start_id = ids
    model = nnx.merge(graphdef, state)
    repeat = options.beam_size if options.beam_size > 1 else options.num_return_sequences
    if hasattr(model, "encode"):
        s = encoder_decoder(model, inputs, max_length=max_length, start_id=start_id,
                            repeat=repeat)
    else:
        s = decoder_lm(model, inputs, valid, max_length=max_length, repeat=repeat)
    return search(s, options, key, batch_size=inputs.shape[0], max_length=max_length,
                  eos_id=eos_id, pad_id=pad_id)


def search(s: Stepper, options: Options, key: jax.Array, *, batch_size: int, max_length: int,
           eos_id: int, pad_id: int) -> jax.Array:
    """Tokens [batch_size * R, max_length] from a stepper built with ``repeat`` = the beam
    size (beam search) or ``num_return_sequences`` (sampling, greedy): what every family's
    decoding shares once its stepper is built."""
    if options.beam_size > 1:
        tokens, _ = beam.beam_search(s, options, batch_size=batch_size, max_length=max_length,
                                     eos_id=eos_id, pad_id=pad_id)
        return tokens.reshape(-1, max_length)
    if options.sampling:
        return sample(s, key, options, max_length=max_length, eos_id=eos_id, pad_id=pad_id)
    return greedy(s, max_length=max_length, eos_id=eos_id, pad_id=pad_id)
