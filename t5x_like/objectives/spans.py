"""Which positions an MLM objective predicts: whole words, n-grams or geometric spans, in jnp.

One selector serves BERT (single tokens or whole words), ALBERT (n-grams, p(n) ~ 1/n) and
SpanBERT (truncated geometric span lengths). It works on one sequence of static length L with
O(L) memory and no data-dependent Python loops, so it runs vmapped inside the jitted step:

1. Eligible tokens are the non-special, non-padding ones. A *word* is a word-start token plus
   the continuation pieces after it; without word starts every eligible token is a word. A
   token right after an ineligible one (after [SEP], say) always starts a word.
2. The words are tiled by consecutive spans of i.i.d. random lengths (counted in words). The
   first span has the residual length (what remains of a span from a random word on), so
   the tiling is stationary: every word is equally likely to open a span. Spans are also
   cut at special tokens, so a span is always a run of adjacent positions.
3. Spans get a uniformly random priority. In that order they fill the token budget (only
   the first ``max_predictions`` spans can be reached, so a top_k replaces a full sort)
   ``k = min(max_predictions, max(1, round(rate * n)), n)`` (n = eligible tokens): a span
   that would overflow keeps its leading whole words that still fit (ALBERT shortens an
   n-gram the same way; SpanBERT cuts its last span at the budget).

With single-token spans this is exactly "k of the n eligible tokens, uniformly without
replacement". With words or longer spans the budget may be under-filled by less than one
word, since words are never split. Cutting the last span biases observed span lengths
slightly towards short ones (SpanBERT, L = 512: mean 3.68 observed for 3.80 drawn); the
test derives that bias from the recipe alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.errors import UserError

SPAN_KINDS = ("single", "ngram", "geometric")


@dataclasses.dataclass(frozen=True)
class SpanLengths:
    """The distribution of span lengths in words (hashable: static under jit).

    ``single``: always 1 (BERT). ``ngram``: n in 1..max_length with p(n) ~ 1/n (ALBERT,
    max_length 3). ``geometric``: p(n) ~ p (1-p)^(n-1) for n in 1..max_length, renormalised
    (SpanBERT, p 0.2, max 10: mean 3.797, the paper's "mean 3.8"; clipping the tail onto 10
    instead would give a mean of 4.46).
    """

    kind: str = "single"
    max_length: int = 1
    p: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SPAN_KINDS:
            raise UserError(f"span length kind {self.kind!r} is unknown; use one of "
                            f"{', '.join(SPAN_KINDS)}.")
        if self.max_length < 1 or (self.kind == "single" and self.max_length != 1):
            raise UserError(f"span max_length must be >= 1 (and 1 for 'single'), got "
                            f"{self.max_length}.")
        if self.kind == "geometric" and not 0.0 < self.p <= 1.0:
            raise UserError(f"geometric span p must be in (0, 1], got {self.p}.")

    def probabilities(self) -> np.ndarray:
        """p(n) for n = 1..max_length, float64, summing to 1."""
        n = np.arange(1, self.max_length + 1, dtype=np.float64)
        if self.kind == "single":
            weights = np.ones(1)
        elif self.kind == "ngram":
            weights = 1.0 / n
        else:
            weights = self.p * (1.0 - self.p) ** (n - 1)
        return weights / weights.sum()

    def mean(self) -> float:
        return float(np.dot(np.arange(1, self.max_length + 1), self.probabilities()))


def uniforms_from_bits(bits: jax.Array) -> jax.Array:
    """float32 in [0, 1) from uint32 random bits (their top 24 bits, exactly representable).

    The objectives draw all their randomness in one ``jax.random.bits`` call per sequence and
    slice it: every separate draw adds a threefry kernel, and those dominate compile time.
    """
    return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def span_lengths_from_uniforms(u: jax.Array, lengths: SpanLengths,
                               residual: bool = False) -> jax.Array:
    """int32 span lengths by inverse CDF: 1 + the number of CDF steps that ``u`` passes.

    ``residual`` draws m with probability P(length >= m) / mean: what remains of the span
    covering a given word of a long tiling, from that word on. Starting the tiling with it
    makes the tiling stationary (every word equally likely to open a span).
    """
    probs = lengths.probabilities()
    if residual:
        probs = probs[::-1].cumsum()[::-1] / lengths.mean()
    steps = jnp.asarray(np.cumsum(probs)[:-1], jnp.float32)
    return 1 + (u[..., None] >= steps).sum(-1, dtype=jnp.int32)


def sample_span_lengths(key: jax.Array, shape: tuple[int, ...], lengths: SpanLengths,
                        residual: bool = False) -> jax.Array:
    """int32 span lengths drawn from ``lengths`` (see ``span_lengths_from_uniforms``)."""
    u = uniforms_from_bits(jax.random.bits(key, shape, jnp.uint32))
    return span_lengths_from_uniforms(u, lengths, residual)


def prediction_budget(eligible: jax.Array, rate: float, max_predictions: int) -> jax.Array:
    """``min(max_predictions, max(1, round(rate * n)), n)`` for n eligible tokens (BERT's count;
    jnp.round is half to even, like Python's round in the reference)."""
    n = eligible.sum(dtype=jnp.int32)
    k = jnp.maximum(1, jnp.round(rate * n.astype(jnp.float32)).astype(jnp.int32))
    return jnp.minimum(jnp.minimum(k, max_predictions), n)


def select_spans(uniforms: jax.Array, eligible: jax.Array, word_starts: jax.Array | None,
                 lengths: SpanLengths, budget: jax.Array,
                 max_budget: int) -> dict[str, jax.Array]:
    """Chooses up to ``budget`` (never more than the static ``max_budget``) eligible positions
    of one sequence in whole spans.

    ``uniforms`` is float [R, L] in [0, 1), all the randomness: span priorities, per-span
    draws and (R = 3, for spans longer than one word) span lengths. ``eligible`` is
    bool [L]; ``word_starts`` bool [L] or None (every token a word). Returns per position:
    ``selected`` (bool), ``span`` (int32 span id, L for ineligible positions),
    ``span_start`` (first position of the span), ``span_end`` (last *selected* position of the
    span, -1 if none) and ``span_draw`` (uniform [0, 1) per span, for per-span decisions).
    """
    length = eligible.shape[0]
    u_priority, span_draw, u_lengths = uniforms[0], uniforms[1], uniforms[-1]
    pos = jnp.arange(length, dtype=jnp.int32)
    if lengths.max_length == 1 and word_starts is None:
        return _select_tokens(u_priority, span_draw, eligible, budget, max_budget)
    prev_eligible = jnp.concatenate([jnp.zeros((1,), bool), eligible[:-1]])
    starts = eligible & ~prev_eligible  # a word never crosses a special token or padding
    if word_starts is not None:
        starts = starts | (eligible & word_starts.astype(bool))
    else:
        starts = eligible
    word = jnp.cumsum(starts, dtype=jnp.int32) - 1  # word index of each eligible token

    # A stationary tiling of the words by spans: span j covers words [ends[j-1], ends[j]).
    if lengths.max_length == 1:
        span_opens_word = jnp.ones((length,), bool)
    else:
        first = span_lengths_from_uniforms(u_lengths[:1], lengths, residual=True)
        rest = span_lengths_from_uniforms(u_lengths[1:], lengths)
        ends = jnp.cumsum(jnp.concatenate([first, rest]))
        span_opens_word = jnp.zeros((length,), bool).at[0].set(True)
        span_opens_word = span_opens_word.at[ends].set(True, mode="drop")
    opens = starts & (span_opens_word[jnp.clip(word, 0)] | ~prev_eligible)
    span = jnp.where(eligible, jnp.cumsum(opens, dtype=jnp.int32) - 1, length)

    # Span sizes in tokens, and where each span and each word begins and ends.
    size = jax.ops.segment_sum(eligible.astype(jnp.int32), span, num_segments=length)
    span_start = jax.ops.segment_min(pos, span, num_segments=length)
    word_id = jnp.where(eligible, word, length)
    word_end = jax.ops.segment_max(pos, word_id, num_segments=length)

    # Random priority; spans fill the budget in that order. Each span holds a token, so only
    # the first max_budget spans can be reached: top_k, not a full sort (8x faster on CPU).
    priority = jnp.where(size > 0, u_priority, 2.0)
    first = jax.lax.top_k(-priority, min(max_budget, length))[1]
    ordered = size[first]
    before = jnp.full((length,), length + 1, jnp.int32).at[first].set(
        jnp.cumsum(ordered) - ordered)

    span_c = jnp.clip(span, 0, length - 1)
    start_here = span_start[span_c]
    through_word = word_end[jnp.clip(word, 0, length - 1)] - start_here + 1
    selected = eligible & (before[span_c] + through_word <= budget)
    span_end = jax.ops.segment_max(jnp.where(selected, pos, -1), span, num_segments=length)
    return {
        "selected": selected,
        "span": span,
        "span_start": jnp.where(eligible, start_here, 0),
        "span_end": jnp.where(eligible, span_end[span_c], -1),
        "span_draw": span_draw[span_c],
    }


def _select_tokens(priority: jax.Array, draw: jax.Array, eligible: jax.Array,
                   budget: jax.Array, max_budget: int) -> dict[str, jax.Array]:
    """``select_spans`` when every span is one token (BERT without whole words): the
    ``budget`` eligible tokens of lowest priority, with no segment sums."""
    length = eligible.shape[0]
    pos = jnp.arange(length, dtype=jnp.int32)
    width = min(max_budget, length)
    first = jax.lax.top_k(-jnp.where(eligible, priority, 2.0), width)[1]
    rank = jnp.full((length,), length, jnp.int32).at[first].set(jnp.arange(width))
    selected = eligible & (rank < budget)
    return {
        "selected": selected,
        "span": jnp.where(eligible, pos, length),
        "span_start": jnp.where(eligible, pos, 0),
        "span_end": jnp.where(selected, pos, -1),
        "span_draw": draw,
    }
