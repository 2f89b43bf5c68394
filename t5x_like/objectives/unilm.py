"""UniLM: one Transformer, four language-modelling objectives chosen by the attention mask.

Masks are boolean [L, L], ``mask[i, j]`` = query i may attend to key j; padding (id
``ids.pad``) is never attended to, and a padding query attends to nothing (its row is all
False; its loss weight is 0). Segments come from ``segment_ids`` (0 = first / source segment,
anything else = second / target segment):

    bidirectional   every token sees every token (MLM, as BERT, across both segments)
    left_to_right   j <= i
    right_to_left   j >= i
    seq2seq         source tokens see the source only; target tokens see the whole source and
                    the target up to and including themselves (= prefix LM, prefix = source)

The mode is drawn per example (``sample_mode``; 1/3 bidirectional, 1/3 seq2seq, 1/6 each
unidirectional by default), or passed in, e.g. one per batch as the paper does. Every mode
trains by masked-token prediction: 15% of the tokens (not pad/BOS/EOS), of those 80% <mask>,
10% random, 10% unchanged, predicted from what the mask lets each position see.

The corruption here is a minimal BERT-style one (exact count ``max(1, round(rate * n))``,
per-token 80/10/10); UniLM's n-gram option (bigrams / trigrams 20% of the time) is not
implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t5x_like.errors import UserError
from t5x_like.objectives.denoising import (
    TokenIds,
    choose_exactly,
    count_of,
    maskable_positions,
    random_tokens,
    uniform,
)

BIDIRECTIONAL, LEFT_TO_RIGHT, RIGHT_TO_LEFT, SEQ2SEQ = 0, 1, 2, 3
MODE_NAMES = ("bidirectional", "left_to_right", "right_to_left", "seq2seq")
MODE_PROBS = (1 / 3, 1 / 6, 1 / 6, 1 / 3)  # indexed by mode: the paper's mixture


def _check_probs(probs) -> None:
    if len(probs) != 4 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
        raise UserError(
            f"mode_probs must be 4 non-negative probabilities (bidirectional, left_to_right, "
            f"right_to_left, seq2seq) summing to 1, got {probs}."
        )


def seq2seq_mask(valid: jax.Array, source: jax.Array) -> jax.Array:
    """[L, L]: ``source`` (bool [L]) tokens see the source; the rest see the source and the
    non-source tokens up to themselves."""
    i = jnp.arange(valid.shape[0])
    causal = i[None, :] <= i[:, None]
    allowed = source[None, :] | (~source[:, None] & causal)
    return allowed & valid[:, None] & valid[None, :]


def prefix_lm_mask(valid: jax.Array, prefix_length: jax.Array | int) -> jax.Array:
    """Prefix LM: the first ``prefix_length`` positions are the (bidirectional) source."""
    return seq2seq_mask(valid, jnp.arange(valid.shape[0]) < prefix_length)


def attention_mask(mode: jax.Array | int, valid: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The [L, L] mask of ``mode`` (an int, traced or not) for one sequence."""
    i = jnp.arange(valid.shape[0])
    both = valid[:, None] & valid[None, :]
    masks = jnp.stack(
        [
            both,
            both & (i[None, :] <= i[:, None]),
            both & (i[None, :] >= i[:, None]),
            seq2seq_mask(valid, valid & (segment_ids == 0)),
        ]
    )
    return masks[mode]


def sample_mode(key: jax.Array, mode_probs: tuple[float, ...] = MODE_PROBS) -> jax.Array:
    """A mode index drawn with ``mode_probs`` (indexed like ``MODE_NAMES``)."""
    return _mode_of(uniform(jax.random.bits(key, (), jnp.uint32)), mode_probs)


def _mode_of(u: jax.Array, mode_probs: tuple[float, ...]) -> jax.Array:
    """The mode a uniform ``u`` falls on (inverse CDF over ``mode_probs``)."""
    _check_probs(mode_probs)
    edges = jnp.cumsum(jnp.asarray(mode_probs[:-1], jnp.float32))
    return jnp.sum(u >= edges).astype(jnp.int32)


def mlm_corrupt(
    key: jax.Array,
    tokens: jax.Array,
    ids: TokenIds,
    *,
    rate: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """``(inputs, weights)``: ``max(1, round(rate * n))`` of the n maskable tokens selected;
    each becomes <mask> (``mask_prob``), a random token (``random_prob``) or stays; weights
    are 1.0 on every selected position (also those left unchanged)."""
    if not 0.0 < rate <= 1.0 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
        raise UserError(
            f"MLM needs 0 < rate <= 1 and mask_prob + random_prob <= 1, got rate={rate}, "
            f"mask_prob={mask_prob}, random_prob={random_prob}."
        )
    bits = jax.random.bits(key, (3, tokens.shape[0]), jnp.uint32)
    maskable = maskable_positions(tokens, ids)
    n = maskable.sum()
    count = jnp.where(n > 0, jnp.maximum(count_of(rate, n), 1), 0)
    selected = choose_exactly(bits[0], maskable, count)
    u = uniform(bits[1])
    replaced = jnp.where(u < mask_prob, ids.mask, tokens)
    if random_prob > 0:
        is_random = (u >= mask_prob) & (u < mask_prob + random_prob)
        replaced = jnp.where(is_random, random_tokens(bits[2], ids), replaced)
    inputs = jnp.where(selected, replaced, tokens).astype(jnp.int32)
    return inputs, selected.astype(jnp.float32)


def unilm_example(
    key: jax.Array,
    tokens: jax.Array,
    segment_ids: jax.Array,
    ids: TokenIds,
    *,
    mode: jax.Array | int | None = None,
    mode_probs: tuple[float, ...] = MODE_PROBS,
    mlm_rate: float = 0.15,
) -> dict[str, jax.Array]:
    """One row of UniLM training data: ``inputs`` (MLM-corrupted), ``targets`` (the original),
    ``weights`` (1.0 where a token is predicted), ``segment_ids``, ``attention_mask`` [L, L]
    and ``mode``. ``mode`` None draws it from ``mode_probs`` with this row's key."""
    k_mode, k_mlm = jax.random.split(key)
    tokens = tokens.astype(jnp.int32)
    if mode is None:
        mode = sample_mode(k_mode, mode_probs)
    else:
        _check_probs(mode_probs)
    mode = jnp.asarray(mode, jnp.int32)
    valid = tokens != ids.pad
    inputs, weights = mlm_corrupt(k_mlm, tokens, ids, rate=mlm_rate)
    return {
        "inputs": inputs,
        "targets": tokens,
        "weights": weights,
        "segment_ids": jnp.where(valid, segment_ids, 0).astype(jnp.int32),
        "attention_mask": attention_mask(mode, valid, segment_ids),
        "mode": mode,
    }
