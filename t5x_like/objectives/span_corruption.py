"""T5 span corruption, in pure jnp with static shapes, so it runs inside the jitted train step.

A raw chunk of L tokens loses ``num_noise`` of them, in ``num_spans`` contiguous spans. The
inputs keep the other tokens and put one sentinel where each span was; the targets list each
span behind its sentinel:

    raw      a b c d e f g h
    inputs   a b <X> e f <Y> h </s>        <X> = vocab_size - 1, <Y> = vocab_size - 2
    targets  <X> c d <Y> g </s>

The counts depend on L only, never on the key, so every row of a batch has the same output
shapes (``I = L - num_noise + num_spans + 1``, ``T = num_noise + num_spans + 1``) and no padding
is needed. Which tokens are noise follows the reference T5 ``random_spans_noise_mask``: noise and
non-noise tokens are each cut into ``num_spans`` random non-empty segments (every cut equally
likely) and the segments alternate, non-noise first.

Counts are rounded with Python's ``round`` (half to even), as T5's ``random_spans_helper`` does;
``tf.round`` in the reference mask rounds half to even too.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from t5x_like.errors import UserError


def _clipped_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """The count formulas without the feasibility check (the length search probes past it)."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, max(1, round(num_noise / mean_noise_span_length))


def noise_span_counts(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(num_noise, num_spans)`` for a raw chunk of ``length`` tokens.

    ``num_noise = clip(round(length * noise_density), 1, length - 1)`` and
    ``num_spans = max(1, round(num_noise / mean_noise_span_length))``: the clips keep at least
    one noise and one non-noise token and one span, as in the reference.
    """
    if length < 2:
        raise UserError(f"span corruption needs raw chunks of at least 2 tokens, got {length}.")
    if not 0.0 < noise_density < 1.0:
        raise UserError(f"noise_density must lie strictly between 0 and 1, got {noise_density}.")
    if mean_noise_span_length <= 0:
        raise UserError(f"mean_noise_span_length must be positive, got {mean_noise_span_length}.")
    num_noise, num_spans = _clipped_counts(length, noise_density, mean_noise_span_length)
    if num_spans > min(num_noise, length - num_noise):
        raise UserError(
            f"noise_density={noise_density} with mean_noise_span_length="
            f"{mean_noise_span_length} asks for {num_spans} spans in {length} tokens, more than "
            f"the {num_noise} noise / {length - num_noise} kept tokens allow; raise "
            "mean_noise_span_length or bring noise_density closer to 0.5."
        )
    return num_noise, num_spans


def _output_lengths(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(inputs, targets) lengths for ``length`` raw tokens, each with its EOS."""
    num_noise, num_spans = _clipped_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(raw_tokens_length, targets_length)``: corrupted inputs + EOS fill ``inputs_length``.

    T5's ``random_spans_helper`` search: the largest raw length L whose inputs fit (the inputs
    length never falls as L grows, so walking up from ``inputs_length - 1`` finds it). Chunking the
    corpus to L tokens then needs no padding: ``(512, 0.15, 3.0) -> (568, 114)``.

    Like the reference, at ``noise_density == 0.5`` L is lowered by one when the targets would
    come out longer than the inputs. The targets length returned is always the one
    ``span_corruption`` produces for L (the reference reports its own estimate minus one there,
    which can differ; and for tiny ``inputs_length`` it allows zero spans, which we clip to one).
    """
    noise_span_counts(2, noise_density, mean_noise_span_length)  # reject bad settings early
    if inputs_length < 3:
        raise UserError(
            f"span corruption needs an inputs length of at least 3 (token, sentinel, EOS), "
            f"got {inputs_length}."
        )

    def inputs_len(raw: int) -> int:
        return _output_lengths(raw, noise_density, mean_noise_span_length)[0]

    raw = max(inputs_length - 1, 2)
    while raw > 2 and inputs_len(raw) > inputs_length:
        raw -= 1  # only reachable when mean_noise_span_length < 1
    while inputs_len(raw + 1) <= inputs_length:
        raw += 1
    inputs, targets = _output_lengths(raw, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets > inputs and raw > 2:
        raw -= 1
        targets = _output_lengths(raw, noise_density, mean_noise_span_length)[1]
    noise_span_counts(raw, noise_density, mean_noise_span_length)  # the chosen L must be feasible
    return raw, targets


def _random_segment_ids(sort_keys: jax.Array, num_segments: int) -> jax.Array:
    """Segment id (0..num_segments-1) of each of ``len(sort_keys) + 1`` items, cut at random.

    The reference's ``_random_segmentation``: shuffle ``num_segments - 1`` ones among the
    gaps between items, put a 0 in front (the first item always opens segment 0) and cumsum, so
    every segment is non-empty and every cut equally likely. The shuffle sorts the cuts by the
    given random keys (one key per gap); a tie between two 32-bit keys, vanishingly rare, would
    only tilt the order, never the number of cuts.
    """
    cuts = (jnp.arange(sort_keys.shape[0]) < num_segments - 1).astype(jnp.int32)
    _, cuts = lax.sort_key_val(sort_keys, cuts)
    return jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32), cuts]))


def _noise_span_index(key: jax.Array, length: int, num_noise: int, num_spans: int) -> jax.Array:
    """Per position: ``2i + 1`` inside noise span i, ``2i`` inside the non-noise run before it.

    Odd means noise. Built like the reference mask: segment lengths of both kinds, interleaved
    (non-noise first), their running ends marked as span starts, and a cumsum over the marks.
    One draw of random bits serves both segmentations (a split and two permutations compiled
    about twice as slowly).
    """
    sort_keys = jax.random.bits(key, (length - 2,))  # one per gap: (num_noise-1) + (num_keep-1)
    noise_ids = _random_segment_ids(sort_keys[: num_noise - 1], num_spans)
    keep_ids = _random_segment_ids(sort_keys[num_noise - 1 :], num_spans)
    noise_lengths = jnp.bincount(noise_ids, length=num_spans)
    keep_lengths = jnp.bincount(keep_ids, length=num_spans)
    interleaved = jnp.stack([keep_lengths, noise_lengths], axis=1).reshape(2 * num_spans)
    span_starts = jnp.cumsum(interleaved)[:-1]  # every start < length: all segments non-empty
    starts = jnp.zeros((length,), jnp.int32).at[span_starts].add(1)
    return jnp.cumsum(starts)


def _corrupt_row(
    key: jax.Array,
    tokens: jax.Array,
    *,
    vocab_size: int,
    num_noise: int,
    num_spans: int,
    eos_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Inputs and targets for one row; compaction by cumsum destinations and a dropping scatter."""
    length = tokens.shape[0]
    inputs_len = length - num_noise + num_spans + 1
    targets_len = num_noise + num_spans + 1

    span_num = _noise_span_index(key, length, num_noise, num_spans)
    is_noise = span_num % 2 == 1
    span = span_num // 2  # index of the noise span a noise position belongs to
    sentinel = (vocab_size - 1 - span).astype(jnp.int32)
    prev_noise = jnp.concatenate([jnp.zeros((1,), bool), is_noise[:-1]])
    span_first = is_noise & ~prev_noise

    # Inputs: keep non-noise tokens and the first position of each span (as its sentinel).
    kept = ~is_noise | span_first
    dest = jnp.where(kept, jnp.cumsum(kept) - 1, inputs_len)  # out of range = dropped
    values = jnp.where(is_noise, sentinel, tokens)
    inputs = jnp.full((inputs_len,), eos_id, jnp.int32).at[dest].set(values, mode="drop")

    # Targets: noise token p lands after the noise tokens before it and one sentinel per span
    # up to its own; each span's sentinel takes the slot just before its first token.
    noise_dest = (jnp.cumsum(is_noise) - 1) + (span + 1)
    token_dest = jnp.where(is_noise, noise_dest, targets_len)
    sentinel_dest = jnp.where(span_first, noise_dest - 1, targets_len)
    targets = jnp.full((targets_len,), eos_id, jnp.int32)
    targets = targets.at[token_dest].set(tokens, mode="drop")
    targets = targets.at[sentinel_dest].set(sentinel, mode="drop")
    return inputs, targets


@functools.partial(jax.jit, static_argnames=("vocab_size", "num_noise", "num_spans", "eos_id"))
def _corrupt_batch(
    key: jax.Array,
    tokens: jax.Array,
    *,
    vocab_size: int,
    num_noise: int,
    num_spans: int,
    eos_id: int,
) -> tuple[jax.Array, jax.Array]:
    """One key per row, the row function vmapped.

    Jitted so that eager calls (tests, host tools) compile once per shape instead of dispatching
    op by op; inside the jitted train step it is simply inlined.
    """
    keys = jax.random.split(key, tokens.shape[0])
    row = functools.partial(
        _corrupt_row,
        vocab_size=vocab_size,
        num_noise=num_noise,
        num_spans=num_spans,
        eos_id=eos_id,
    )
    return jax.vmap(row)(keys, tokens)


def span_corruption(
    key: jax.Array,
    tokens: jax.Array,
    *,
    vocab_size: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    eos_id: int = 1,
) -> dict[str, jax.Array]:
    """T5 span corruption of full raw chunks ``tokens`` (int [batch, L]), a fresh mask per row.

    ``key`` covers the whole batch (in training ``fold_in(seed_key, step)``, so the noise is new
    every step and the same after a resume); it is split into one key per row. ``vocab_size`` is
    the vocabulary's own size, not the padded embedding size: span i's sentinel is
    ``vocab_size - 1 - i`` (``<extra_id_0>`` is the top id, counting down). ``vocab_size``, the
    densities and ``eos_id`` are Python values, static under ``jax.jit``.

    Returns int32 ``{"inputs": [batch, L - num_noise + num_spans + 1],
    "targets": [batch, num_noise + num_spans + 1]}``, both ending in ``eos_id``; see
    ``noise_span_counts`` for the counts and ``span_corruption_lengths`` to choose L.
    """
    if tokens.ndim != 2:
        raise UserError(
            f"span_corruption takes tokens shaped [batch, length], got shape {tokens.shape}."
        )
    num_noise, num_spans = noise_span_counts(tokens.shape[1], noise_density, mean_noise_span_length)
    if num_spans > vocab_size:
        raise UserError(f"{num_spans} spans need more sentinels than vocab_size={vocab_size}.")

    inputs, targets = _corrupt_batch(
        key,
        tokens.astype(jnp.int32),
        vocab_size=vocab_size,
        num_noise=num_noise,
        num_spans=num_spans,
        eos_id=eos_id,
    )
    return {"inputs": inputs, "targets": targets}
