"""BART's five noising functions in pure jnp with static shapes, run inside the jitted step.

Every function works on ONE sequence (``tokens``: int [L], padding ``ids.pad`` at the end) with
its own key; vmap it over the batch with one key per row (``jax.random.split(fold_in(seed,
step), batch)``). A row is read as ``[BOS] body [EOS] pad...``: a leading BOS (when
``ids.bos`` is set) and the last content token when it is EOS stay where they are; everything
between is the *body*. Masking, deletion and infilling never touch pad / BOS / EOS tokens
anywhere in the row (an EOS inside the body, between two packed documents, stays too).

    token_masking        round(rate * m) body tokens -> <mask> (or a random token, random_ratio)
    token_deletion       round(rate * m) body tokens removed, the rest closed up, padded to L
    text_infilling       spans with Poisson(lambda) lengths, round(rate * m) tokens in all; each
                         span -> ONE <mask>; zero-length spans insert a <mask>
    sentence_permutation the body's sentences in a uniformly random order
    document_rotation    the body rotated to start at a uniformly random token (BOS stays first)

(m = number of maskable body tokens.) ``bart_noise`` composes them from a ``BartNoise`` spec in
fairseq's order — its ``DenoisingDataset`` permutes sentences, then masks (its one masking
routine is token masking, deletion or infilling depending on flags; here all three may be on,
in that order), then rotates — and returns fixed-length ``inputs`` / ``targets`` with lengths
and weights. ``BART_PAPER`` is the paper's recipe: infilling of 30% + permutation of all
sentences.

Counts are exact, not Bernoulli: fairseq draws ``ceil(p * n)`` positions without replacement;
here ``round(rate * m)``, so the masked share is ``rate`` to within half a token per row.
Infilling differs from fairseq on purpose in one respect: fairseq drops spans at random starts
and lets them overlap (so it masks less than its budget); here spans never overlap and at least
one kept token separates two spans, so every <mask> stands for exactly one span and the budget
is met exactly. Spans are laid out left to right in the order their lengths were drawn, gaps
uniformly at random (every placement equally likely). A span may straddle an EOS inside the
body (the EOS stays, the span's <mask> stands where the span starts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from t5x_like.errors import UserError


# ------------------------------------------------------------------------------------ ids
@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special ids the noising functions need (Python ints, static under jit).

    ``bos`` is None for vocabularies without one (T5's). ``vocab_size`` is only needed for
    random replacement; random tokens are uniform over ``[0, vocab_size)`` minus pad, BOS, EOS
    and mask. ``sentence_end`` lists ids that end a sentence (".", "!", "?" pieces, or a
    separator); ``sentence_permutation`` may instead take a per-position boolean array.
    """

    mask: int
    eos: int = 1
    bos: int | None = None
    pad: int = 0
    vocab_size: int | None = None
    sentence_end: tuple[int, ...] = ()

    def __post_init__(self):
        special = [self.pad, self.eos, self.mask] + ([] if self.bos is None else [self.bos])
        if len(set(special)) != len(special):
            raise UserError(f"pad, eos, bos and mask ids must all differ, got {self}.")
        if self.vocab_size is not None and (
            self.vocab_size <= len(special) or max(special) >= self.vocab_size
        ):
            raise UserError(
                f"vocab_size={self.vocab_size} must exceed every special id {sorted(special)} "
                "and leave ordinary tokens; pass the vocabulary's real size."
            )
        object.__setattr__(self, "sentence_end", tuple(int(i) for i in self.sentence_end))

    @property
    def special(self) -> tuple[int, ...]:
        """Sorted distinct ids random replacement must avoid."""
        ids = {self.pad, self.eos, self.mask} | ({self.bos} if self.bos is not None else set())
        return tuple(sorted(ids))


# ------------------------------------------------------------------------------------ helpers
def document_body(tokens: jax.Array, ids: TokenIds) -> tuple[jax.Array, jax.Array]:
    """``(start, end)`` of the body: after a leading BOS, before a trailing EOS (end exclusive).

    Content is the non-pad prefix of the row; an empty row gives an empty body.
    """
    n = jnp.sum(tokens != ids.pad).astype(jnp.int32)
    start = jnp.int32(0)
    if ids.bos is not None:
        start = ((n > 0) & (tokens[0] == ids.bos)).astype(jnp.int32)
    last = tokens[jnp.maximum(n - 1, 0)]
    end = n - ((n > start) & (last == ids.eos)).astype(jnp.int32)
    return start, end


def maskable_positions(tokens: jax.Array, ids: TokenIds) -> jax.Array:
    """Positions noise may change: content that is not pad, BOS or EOS."""
    out = (tokens != ids.pad) & (tokens != ids.eos)
    if ids.bos is not None:
        out &= tokens != ids.bos
    return out


def count_of(rate: float, available: jax.Array) -> jax.Array:
    """``round(rate * available)`` as int32: the exact number of positions to noise."""
    return jnp.round(rate * available.astype(jnp.float32)).astype(jnp.int32)


# Randomness: each function draws ONE block of 32-bit words from its key and slices it. Every
# jax.random call inlines its own threefry, and on CPU each took ~1 s to compile (the same
# choice span_corruption makes); words become uniforms, choices and ids below.
def uniform(bits: jax.Array) -> jax.Array:
    """float32 in [0, 1) from the top 24 bits of each word (exact, no rounding to 1)."""
    return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def below(bits: jax.Array, bound: jax.Array | int) -> jax.Array:
    """int32 uniform in ``[0, bound)`` (``bound >= 1``), by remainder: the bias is below
    bound / 2**32."""
    return (bits % jnp.asarray(bound).astype(jnp.uint32)).astype(jnp.int32)


def random_order(bits: jax.Array, valid: jax.Array) -> jax.Array:
    """A permutation of ``arange(len(valid))``: valid indices first, in uniformly random order
    (sorted by the random words; a tie, probability ~len**2 / 2**33, falls back to index
    order), then the invalid ones in index order."""
    iota = jnp.arange(valid.shape[0], dtype=jnp.int32)
    bits = jnp.where(valid, bits, 0)
    return lax.sort(((~valid).astype(jnp.int32), bits, iota), num_keys=3)[2]


def choose_exactly(bits: jax.Array, eligible: jax.Array, count: jax.Array | int) -> jax.Array:
    """Boolean mask of ``count`` eligible positions, every such subset equally likely."""
    order = random_order(bits, eligible)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    return eligible & (rank < count)


def random_tokens(bits: jax.Array, ids: TokenIds) -> jax.Array:
    """Uniform ids over ``[0, vocab_size)`` minus the special ids (shifted past each of them)."""
    if ids.vocab_size is None:
        raise UserError("random replacement needs TokenIds.vocab_size; set it or use ratio 0.")
    special = ids.special
    x = below(bits, ids.vocab_size - len(special))
    for s in special:  # ascending: each shift may carry x past the next special id
        x = x + (x >= s).astype(jnp.int32)
    return x


def _check_random(ids: TokenIds, random_ratio: float) -> None:
    _check_rate("random_ratio", random_ratio)
    if random_ratio > 0 and ids.vocab_size is None:
        raise UserError("random replacement needs TokenIds.vocab_size; set it or use ratio 0.")


def _mask_fill(coin_bits: jax.Array, token_bits: jax.Array, ids: TokenIds, random_ratio: float):
    """<mask>, or with probability ``random_ratio`` a random token (fairseq's mask_random)."""
    fill = jnp.full(coin_bits.shape, ids.mask, jnp.int32)
    if random_ratio <= 0.0:
        return fill
    return jnp.where(uniform(coin_bits) < random_ratio, random_tokens(token_bits, ids), fill)


def _move(tokens: jax.Array, new_pos: jax.Array, length: int, pad: int) -> jax.Array:
    """Scatter each token to ``new_pos`` (out of range = dropped) in a padded row of ``length``."""
    out = jnp.full((length,), pad, jnp.int32)
    return out.at[new_pos].set(tokens.astype(jnp.int32), mode="drop")


def _check_rate(name: str, rate: float, high: float = 1.0) -> None:
    if not 0.0 <= rate <= high:
        raise UserError(f"{name} must lie in [0, {high}], got {rate}.")


# ------------------------------------------------------------------------------------ noise
def token_masking(
    key: jax.Array, tokens: jax.Array, ids: TokenIds, *, rate: float, random_ratio: float = 0.0
) -> jax.Array:
    """Replace ``round(rate * m)`` maskable tokens by <mask> (a ``random_ratio`` share of them
    by random tokens). Length and everything else unchanged."""
    _check_rate("token masking rate", rate)
    _check_random(ids, random_ratio)
    bits = jax.random.bits(key, (3, tokens.shape[0]), jnp.uint32)
    maskable = maskable_positions(tokens, ids)
    chosen = choose_exactly(bits[0], maskable, count_of(rate, maskable.sum()))
    return jnp.where(chosen, _mask_fill(bits[1], bits[2], ids, random_ratio), tokens)


def token_deletion(key: jax.Array, tokens: jax.Array, ids: TokenIds, *, rate: float) -> jax.Array:
    """Remove ``round(rate * m)`` maskable tokens; survivors keep their order, padded to L."""
    _check_rate("token deletion rate", rate)
    maskable = maskable_positions(tokens, ids)
    bits = jax.random.bits(key, tokens.shape, jnp.uint32)
    deleted = choose_exactly(bits, maskable, count_of(rate, maskable.sum()))
    keep = (tokens != ids.pad) & ~deleted
    dest = jnp.where(keep, jnp.cumsum(keep) - 1, tokens.shape[0])
    return _move(tokens, dest, tokens.shape[0], ids.pad)


def _poisson(bits: jax.Array, lam: float) -> jax.Array:
    """Poisson(lam) draws, one per word, by inverting the CDF (a table up to a tail of 1e-9;
    the 24-bit uniforms resolve probabilities to 6e-8). ``jax.random.poisson``'s rejection
    loops took seconds to compile."""
    pmf, cdf, k = math.exp(-lam), [], 0
    while not cdf or (1.0 - cdf[-1] > 1e-9 and k < 10 * lam + 100):
        cdf.append((cdf[-1] if cdf else 0.0) + pmf)
        k += 1
        pmf *= lam / k
    table = jnp.asarray(cdf, jnp.float32)
    return jnp.searchsorted(table, uniform(bits), side="right").astype(jnp.int32)


def _infill_spans(
    bits: jax.Array, budget: jax.Array, max_spans: jax.Array, slots: jax.Array, lam: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(starts, lengths, valid)`` of the spans, in maskable-rank coordinates, [n] each.

    Lengths ~ Poisson(lam) are drawn until they cover ``budget``; the last is trimmed so they
    sum to it exactly. Zero-length spans that would make more than ``max_spans`` spans are
    dropped (only very short rows ever get there; it keeps spans separable and the output
    within its length). K spans need ``K - 1`` separating kept tokens; the other kept tokens
    fall into the K + 1 gaps uniformly at random: K "bars" among ``slots = m - budget + 1``
    places (stars and bars), span i starting at ``bar_i + (lengths before i)``.
    """
    n = bits.shape[1] - 1  # bits: [2, n + 1]
    raw = _poisson(bits[0, :n], lam)
    before = jnp.cumsum(raw) - raw
    drawn = before < budget  # span i is drawn while the budget is not yet covered
    lengths = jnp.where(drawn, jnp.minimum(raw, budget - before), 0)
    positive = drawn & (lengths > 0)
    zero = drawn & (lengths == 0)
    keep = positive | (zero & (jnp.cumsum(zero) <= max_spans - positive.sum()))
    dest = jnp.where(keep, jnp.cumsum(keep) - 1, n)
    lengths = jnp.zeros((n,), jnp.int32).at[dest].set(lengths, mode="drop")
    num_spans = keep.sum()

    iota = jnp.arange(n + 1, dtype=jnp.int32)
    bars = choose_exactly(bits[1], iota < slots, num_spans)
    bars = jnp.sort(jnp.where(bars, iota, n + 1))[:n]
    valid = jnp.arange(n) < num_spans
    starts = bars + jnp.cumsum(lengths) - lengths
    return jnp.where(valid, starts, 0), lengths, valid


def text_infilling(
    key: jax.Array,
    tokens: jax.Array,
    ids: TokenIds,
    *,
    rate: float,
    poisson_lambda: float = 3.0,
    random_ratio: float = 0.0,
    output_length: int | None = None,
) -> jax.Array:
    """Replace non-overlapping spans (Poisson(lambda) lengths, ``round(rate * m)`` tokens in
    all) by one <mask> each; zero-length spans insert a <mask>. Padded to ``output_length``
    (default L; at least L). ``rate`` is at most 0.5 so that spans can always be separated."""
    _check_rate("text infilling rate", rate, 0.5)
    _check_random(ids, random_ratio)
    if poisson_lambda <= 0:
        raise UserError(f"poisson_lambda must be positive, got {poisson_lambda}.")
    n = tokens.shape[0]
    out_len = n if output_length is None else output_length
    if out_len < n:
        raise UserError(f"output_length={out_len} is shorter than the input length {n}.")
    bits = jax.random.bits(key, (4, n + 1), jnp.uint32)
    pos = jnp.arange(n, dtype=jnp.int32)
    content = tokens != ids.pad
    maskable = maskable_positions(tokens, ids)
    m = maskable.sum().astype(jnp.int32)
    budget = count_of(rate, m)
    rank = jnp.where(maskable, jnp.cumsum(maskable) - 1, n + 1)

    # K spans need K - 1 <= m - budget separators, and the output (content - budget + K
    # tokens) must fit in out_len. Positive spans (at most budget <= m - budget + 1 of them,
    # as rate <= 0.5) always fit; zero-length ones take what room is left.
    slots = m - budget + 1
    max_spans = jnp.minimum(slots, out_len - content.sum() + budget)
    starts, lengths, valid = _infill_spans(bits[:2], budget, max_spans, slots, poisson_lambda)

    # Which maskable ranks fall inside a span: +1 at each start, -1 at each end, cumsum.
    edge = jnp.zeros((n + 1,), jnp.int32)
    edge = edge.at[jnp.where(valid, starts, n + 1)].add(1, mode="drop")
    edge = edge.at[jnp.where(valid, starts + lengths, n + 1)].add(-1, mode="drop")
    covered = jnp.cumsum(edge)[jnp.minimum(rank, n)] > 0
    kept = content & ~(maskable & covered)

    # Position of each rank (rank m = just after the last maskable token, for end insertions).
    pos_of_rank = jnp.zeros((n + 1,), jnp.int32).at[rank].set(pos, mode="drop")
    after_last = jnp.where(m > 0, pos_of_rank[jnp.maximum(m - 1, 0)] + 1, 0)
    pos_of_rank = pos_of_rank.at[m].set(after_last)
    start_pos = pos_of_rank[starts]

    # A kept token moves left past the dropped tokens and right past the <mask> of every span
    # starting at or before it; span i's <mask> follows the kept tokens before its start.
    kept_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(kept)])
    opened = (
        jnp.zeros((n + 1,), jnp.int32).at[jnp.where(valid, start_pos, n + 1)].add(1, mode="drop")
    )
    opened = jnp.cumsum(opened)
    token_dest = jnp.where(kept, kept_before[:n] + opened[:n], out_len)
    mask_dest = jnp.where(valid, kept_before[start_pos] + jnp.arange(n), out_len)
    out = _move(tokens, token_dest, out_len, ids.pad)
    fill = _mask_fill(bits[2, :n], bits[3, :n], ids, random_ratio)
    return out.at[mask_dest].set(fill, mode="drop")


def _sentence_end_mask(
    tokens: jax.Array, ids: TokenIds, sentence_ends: jax.Array | None
) -> jax.Array:
    """Where sentences end: ids in ``ids.sentence_end``, or the given boolean array, or EOS."""
    if sentence_ends is None and not ids.sentence_end:
        raise UserError(
            "sentence permutation needs sentence ends: set TokenIds.sentence_end to the ids "
            "that end a sentence, or pass a boolean sentence_ends array."
        )
    ends = tokens == ids.eos
    if ids.sentence_end:
        ends |= jnp.isin(tokens, jnp.asarray(ids.sentence_end, tokens.dtype))
    if sentence_ends is not None:
        if sentence_ends.shape != tokens.shape:
            raise UserError(
                f"sentence_ends has shape {sentence_ends.shape}; it must match the tokens "
                f"{tokens.shape}."
            )
        ends |= sentence_ends.astype(bool)
    return ends


def sentence_permutation(
    key: jax.Array, tokens: jax.Array, ids: TokenIds, *, sentence_ends: jax.Array | None = None
) -> jax.Array:
    """Shuffle the body's sentences (all of them, uniformly). A sentence runs up to and
    including an end token (or an EOS inside the body); the body's last token closes the last
    one. BOS, the trailing EOS and padding stay in place."""
    n = tokens.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    is_end = _sentence_end_mask(tokens, ids, sentence_ends)
    start, end = document_body(tokens, ids)
    body = (pos >= start) & (pos < end)
    is_end = body & (is_end | (pos == end - 1))
    sentence = jnp.where(body, jnp.cumsum(is_end) - is_end, 0)  # index of each token's sentence
    lengths = jnp.zeros((n,), jnp.int32).at[jnp.where(body, sentence, n)].add(1, mode="drop")
    first = start + jnp.cumsum(lengths) - lengths

    bits = jax.random.bits(key, (n,), jnp.uint32)
    order = random_order(bits, pos < is_end.sum())  # slot k holds sentence order[k]
    new_first = start + jnp.cumsum(lengths[order]) - lengths[order]
    slot = jnp.zeros((n,), jnp.int32).at[order].set(pos)
    new_pos = jnp.where(body, new_first[slot[sentence]] + pos - first[sentence], pos)
    return _move(tokens, new_pos, n, ids.pad)


def document_rotation(
    key: jax.Array, tokens: jax.Array, ids: TokenIds, *, rate: float = 1.0
) -> jax.Array:
    """With probability ``rate``, rotate the body to start at a uniformly random body token
    (fairseq's rolling noise: BOS stays first, the trailing EOS last)."""
    _check_rate("rotation rate", rate)
    n = tokens.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    bits = jax.random.bits(key, (2,), jnp.uint32)
    start, end = document_body(tokens, ids)
    size = jnp.maximum(end - start, 1)
    offset = jnp.where(uniform(bits[0]) < rate, below(bits[1], size), 0)
    body = (pos >= start) & (pos < end)
    new_pos = jnp.where(body, start + jnp.mod(pos - start - offset, size), pos)
    return _move(tokens, new_pos, n, ids.pad)


# ------------------------------------------------------------------------------------ spec
@dataclasses.dataclass(frozen=True)
class BartNoise:
    """Which noise ``bart_noise`` applies, and how much (a config section, validated).

    ``mask_ratio``: token masking; ``delete_ratio``: token deletion; ``infill_ratio``: text
    infilling (at most 0.5) with ``poisson_lambda``; ``random_ratio``: share of <mask>es
    replaced by random tokens, for masking and infilling (fairseq ``--mask-random``);
    ``permute_sentences``: shuffle all sentences; ``rotate_ratio``: probability of rotating.
    """

    mask_ratio: float = 0.0
    delete_ratio: float = 0.0
    infill_ratio: float = 0.0
    poisson_lambda: float = 3.0
    random_ratio: float = 0.0
    permute_sentences: bool = False
    rotate_ratio: float = 0.0

    def __post_init__(self):
        _check_rate("mask_ratio", self.mask_ratio)
        _check_rate("delete_ratio", self.delete_ratio)
        _check_rate("infill_ratio", self.infill_ratio, 0.5)
        _check_rate("random_ratio", self.random_ratio)
        _check_rate("rotate_ratio", self.rotate_ratio)
        if self.poisson_lambda <= 0:
            raise UserError(f"poisson_lambda must be positive, got {self.poisson_lambda}.")

    @classmethod
    def from_dict(cls, values: Mapping) -> BartNoise:
        """Strict: an unknown key is a UserError naming it and the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown BART noise option(s) {unknown}; known: {sorted(names)}.")
        return cls(**dict(values))


BART_PAPER = BartNoise(infill_ratio=0.3, poisson_lambda=3.0, permute_sentences=True)
"""The BART paper's final recipe: text infilling of 30% (Poisson(3) spans) + all sentences
permuted."""


def bart_noise(
    key: jax.Array,
    tokens: jax.Array,
    noise: BartNoise,
    ids: TokenIds,
    *,
    sentence_ends: jax.Array | None = None,
    output_length: int | None = None,
) -> dict[str, jax.Array]:
    """One row of BART pretraining data: the noised ``inputs`` [output_length] (default L) and
    the original ``targets`` [L], both padded with ``ids.pad``, with their lengths and the
    targets' loss weights (1.0 on every non-pad target).

    Order (fairseq's): sentence permutation, token masking, token deletion, text infilling,
    document rotation; each step gets its own sub-key (``jax.random.split(key, 5)`` in that
    order), so turning one step on or off leaves the others' randomness unchanged.
    """
    n = tokens.shape[0]
    out_len = n if output_length is None else output_length
    if out_len < n:
        raise UserError(f"output_length={out_len} is shorter than the input length {n}.")
    tokens = tokens.astype(jnp.int32)
    k_perm, k_mask, k_del, k_fill, k_rot = jax.random.split(key, 5)
    x = tokens
    if noise.permute_sentences:
        x = sentence_permutation(k_perm, x, ids, sentence_ends=sentence_ends)
    if noise.mask_ratio > 0:
        x = token_masking(k_mask, x, ids, rate=noise.mask_ratio, random_ratio=noise.random_ratio)
    if noise.delete_ratio > 0:
        x = token_deletion(k_del, x, ids, rate=noise.delete_ratio)
    if noise.infill_ratio > 0:
        x = text_infilling(
            k_fill,
            x,
            ids,
            rate=noise.infill_ratio,
            poisson_lambda=noise.poisson_lambda,
            random_ratio=noise.random_ratio,
            output_length=out_len,
        )
    x = jnp.pad(x, (0, out_len - x.shape[0]), constant_values=ids.pad)
    if noise.rotate_ratio > 0:
        x = document_rotation(k_rot, x, ids, rate=noise.rotate_ratio)
    target_weights = (tokens != ids.pad).astype(jnp.float32)
    return {
        "inputs": x,
        "targets": tokens,
        "inputs_length": jnp.sum(x != ids.pad).astype(jnp.int32),
        "targets_length": jnp.sum(tokens != ids.pad).astype(jnp.int32),
        "target_weights": target_weights,
    }
