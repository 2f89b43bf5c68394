"""UniLM: one Transformer, four language-modelling objectives chosen by the attention mask.

Masks are boolean [L, L], ``mask[i, j]`` = query i may attend to key j; padding (id 0) is
never attended to, and a padding query attends to nothing (its row is all False; its loss
weight is 0). Segments come from ``segment_ids`` (0 = first / source segment,
anything else = second / target segment):

    bidirectional   every token sees every token (MLM, as BERT, across both segments)
    left_to_right   j <= i
    right_to_left   j >= i
    seq2seq         source tokens see the source only; target tokens see the whole source and
                    the target up to and including themselves (= prefix LM, prefix = source)

The mode is drawn per example (``sample_mode``; 1/3 bidirectional, 1/3 seq2seq, 1/6 each
unidirectional by default), or passed in, e.g. one per batch as the paper does. Every mode
trains by masked-token prediction with BERT's corruption (``masking.mask``: 15% of the
non-special tokens, of those 80% <mask>, 10% random, 10% unchanged), each masked token
predicted from what the attention mask lets its position see. UniLM's n-gram option (bigrams
/ trigrams 20% of the time) is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from t5x_like.errors import UserError
from t5x_like.objectives.denoising import uniform
from t5x_like.objectives.masking import PAD_ID, MaskingConfig, bert_masking, mask

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


def unilm_masking(
    vocab_size: int, mask_id: int, special_ids: Sequence[int], max_predictions: int, **overrides
) -> MaskingConfig:
    """UniLM's corruption: BERT's (15% of the non-special tokens, 80% <mask> / 10% random /
    10% kept), from ``masking``."""
    return bert_masking(vocab_size, mask_id, special_ids, max_predictions, **overrides)


def unilm_example(
    key: jax.Array,
    tokens: jax.Array,
    segment_ids: jax.Array,
    masking: MaskingConfig,
    *,
    mode: jax.Array | int | None = None,
    mode_probs: tuple[float, ...] = MODE_PROBS,
) -> dict[str, jax.Array]:
    """One row of UniLM training data (``tokens`` int [L], 0 = padding): ``masking.mask``'s
    features (``inputs``, ``targets``, ``weights``, ``positions``, ...) plus ``segment_ids``,
    ``attention_mask`` [L, L] and ``mode``. ``mode`` None draws it from ``mode_probs`` with
    this row's key; pass one (traced or not) to use the same mode for a whole batch."""
    _check_probs(mode_probs)
    k_mode, k_mlm = jax.random.split(key)
    tokens = tokens.astype(jnp.int32)
    if mode is None:
        mode = sample_mode(k_mode, mode_probs)
    mode = jnp.asarray(mode, jnp.int32)
    valid = tokens != PAD_ID
    return {
        **mask(k_mlm, tokens, masking),
        "segment_ids": jnp.where(valid, segment_ids, 0).astype(jnp.int32),
        "attention_mask": attention_mask(mode, valid, segment_ids),
        "mode": mode,
    }
