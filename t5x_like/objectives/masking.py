"""Masked language modelling inputs for BERT, RoBERTa, ALBERT, SpanBERT and ELECTRA, in jnp.

``mask(key, tokens, config, word_starts)`` corrupts one sequence of static length L: it
selects positions (``spans.select_spans``: single tokens, whole words, n-grams or geometric
spans within a 15% budget) and replaces them: ``mask_fraction`` -> ``mask_id``,
``random_fraction`` -> a random ordinary token, the rest unchanged. The key comes from the
trainer (``fold_in(seed, step)``), so every step masks afresh (RoBERTa's dynamic masking);
static masking is a fixed key, nothing more. ``mask_batch`` splits a key over the rows of a
batch. The presets ``bert_masking``, ``albert_masking``, ``spanbert_masking`` and
``electra_masking`` carry the published recipes: BERT (Devlin et al., 2019, §3.1: 15% of
tokens, 80% [MASK] / 10% random / 10% kept), ALBERT (Lan et al., 2020, §4.1: n-grams up to
n = 3 with p(n) ~ 1/n), SpanBERT (Joshi et al., 2020, §3.1: span lengths ~ Geo(0.2) clipped
at 10 words, replaced per span) and ELECTRA (google-research/electra,
``pretrain/pretrain_helpers.py``, ``mask``: 85% of the selected tokens become [MASK]).

Outputs (per sequence; every shape fixed by L and ``max_predictions`` P):

    inputs            int32 [L]  corrupted ids
    targets           int32 [L]  original ids
    weights           f32   [L]  1 at every selected position: the loss counts all of them,
                                 also the unchanged and randomised ones
    positions         int32 [P]  selected positions, ascending, then 0s (BERT's
                                 masked_lm_positions), so the MLM head runs only there
    position_targets  int32 [P]  the original ids there (masked_lm_ids)
    position_weights  f32   [P]  1 for the filled slots (masked_lm_weights)

and with ``config.span_boundaries`` (SpanBERT), per slot: ``span_left`` / ``span_right``, the
positions just outside the selected span (s - 1, e + 1, clipped to the sequence), and
``span_offset``, the slot's position inside its span (0 for the first token).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.errors import UserError
from t5x_like.objectives.spans import (
    SpanLengths,
    prediction_budget,
    select_spans,
    uniforms_from_bits,
)

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """One MLM recipe; frozen and hashable, so it is a static argument under jit.

    ``special_ids`` are never selected (padding, id 0, never is either) and never drawn as
    random tokens. Random tokens come from ``[random_range[0], random_range[1])`` minus the
    special ids and ``mask_id``; the default range is the whole vocabulary. With
    ``replace_per_span`` one draw decides [MASK] / random / keep for a whole span (SpanBERT);
    otherwise each token draws its own (BERT, ALBERT).
    """

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    max_predictions: int
    rate: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    random_range: tuple[int, int] | None = None
    spans: SpanLengths = SpanLengths()
    replace_per_span: bool = False
    span_boundaries: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_ids", tuple(sorted({*self.special_ids, PAD_ID})))
        if not 0 <= self.mask_id < self.vocab_size:
            raise UserError(f"mask_id {self.mask_id} is outside the vocabulary "
                            f"[0, {self.vocab_size}); pass the id of the [MASK] token.")
        if self.max_predictions < 1:
            raise UserError(f"max_predictions must be >= 1, got {self.max_predictions}.")
        if not 0.0 < self.rate < 1.0:
            raise UserError(f"masking rate must be in (0, 1), got {self.rate}.")
        if (min(self.mask_fraction, self.random_fraction) < 0
                or self.mask_fraction + self.random_fraction > 1.0):
            raise UserError(f"mask_fraction {self.mask_fraction} and random_fraction "
                            f"{self.random_fraction} must be >= 0 and sum to at most 1.")
        if self.random_fraction > 0 and not self.random_ids_excluded()[1]:
            raise UserError(f"random_range {self.random_range} holds no ordinary token; widen "
                            "it or set random_fraction=0.")

    def random_ids_excluded(self) -> tuple[tuple[int, int], int]:
        """((low, high), how many ids in it may be drawn)."""
        low, high = self.random_range or (0, self.vocab_size)
        if not 0 <= low < high <= self.vocab_size:
            raise UserError(f"random_range ({low}, {high}) must lie within [0, "
                            f"{self.vocab_size}) and be non-empty.")
        excluded = [i for i in self._never_random() if low <= i < high]
        return (low, high), high - low - len(excluded)

    def _never_random(self) -> tuple[int, ...]:
        return tuple(sorted({*self.special_ids, self.mask_id}))


def bert_masking(vocab_size: int, mask_id: int, special_ids: Sequence[int],
                 max_predictions: int, **overrides) -> MaskingConfig:
    """BERT: 15% of tokens (or whole words, given word starts), 80% [MASK] / 10% random /
    10% kept. RoBERTa is the same recipe with a fresh key per step."""
    return MaskingConfig(vocab_size, mask_id, tuple(special_ids), max_predictions, **overrides)


def albert_masking(vocab_size: int, mask_id: int, special_ids: Sequence[int],
                   max_predictions: int, max_ngram: int = 3, **overrides) -> MaskingConfig:
    """ALBERT: n-grams of n = 1..max_ngram words with p(n) ~ 1/n, 80/10/10 per token."""
    spans = SpanLengths("ngram", max_ngram)
    return MaskingConfig(vocab_size, mask_id, tuple(special_ids), max_predictions,
                         spans=spans, **overrides)


def spanbert_masking(vocab_size: int, mask_id: int, special_ids: Sequence[int],
                     max_predictions: int, p: float = 0.2, max_span: int = 10,
                     **overrides) -> MaskingConfig:
    """SpanBERT: geometric(p) span lengths up to max_span words, 80/10/10 per span, and the
    boundary positions for the span-boundary objective."""
    spans = SpanLengths("geometric", max_span, p)
    return MaskingConfig(vocab_size, mask_id, tuple(special_ids), max_predictions, spans=spans,
                         replace_per_span=True, span_boundaries=True, **overrides)


def electra_masking(vocab_size: int, mask_id: int, special_ids: Sequence[int],
                    max_predictions: int, **overrides) -> MaskingConfig:
    """ELECTRA's generator input, as its public code: 85% of the selected -> [MASK], 15% kept,
    no random tokens (the generator's samples replace all selected positions later)."""
    settings = {"mask_fraction": 0.85, "random_fraction": 0.0, **overrides}
    return MaskingConfig(vocab_size, mask_id, tuple(special_ids), max_predictions, **settings)


def word_start_table(pieces: Sequence[str], style: str) -> np.ndarray:
    """bool [vocab]: which vocabulary pieces open a word; index it with ids on the host or the
    device (``table[tokens]``) to get ``word_starts``.

    ``wordpiece``: every piece but ``##`` continuations. ``sentencepiece``: pieces with the
    ``▁`` word marker, control pieces such as ``</s>`` or ``<extra_id_0>`` and lone
    punctuation; byte pieces (``<0xE2>``) and other marker-less pieces continue a word.
    """
    if style == "wordpiece":
        return np.array([not p.startswith("##") for p in pieces], bool)
    if style == "sentencepiece":
        def opens(piece: str) -> bool:
            if piece.startswith("<0x") and piece.endswith(">"):
                return False
            control = piece.startswith("<") and piece.endswith(">") and len(piece) > 2
            punct = len(piece) == 1 and not piece.isalnum()
            return piece.startswith("\u2581") or control or punct

        return np.array([opens(p) for p in pieces], bool)
    raise UserError(f"word start style {style!r} is unknown; use 'wordpiece' or "
                    "'sentencepiece'.")


def _random_tokens(bits: jax.Array, config: MaskingConfig) -> jax.Array:
    """Uniform over the allowed range minus the excluded ids: draw among the allowed count
    (``bits % allowed``: the modulo bias, below allowed / 2^32, is ~1e-5 for any vocabulary),
    then step over each excluded id at or below the draw (ascending, so the steps compose)."""
    (low, _), allowed = config.random_ids_excluded()
    draw = low + (bits % jnp.uint32(max(allowed, 1))).astype(jnp.int32)
    for skipped in config._never_random():
        if skipped >= low:
            draw = draw + (draw >= skipped).astype(jnp.int32)
    return draw


def mask(key: jax.Array, tokens: jax.Array, config: MaskingConfig,
         word_starts: jax.Array | None = None) -> dict[str, jax.Array]:
    """Corrupts one sequence ``tokens`` (int [L], 0 = padding); see the module docstring for
    the outputs. ``word_starts`` (bool [L]) switches on whole-word units."""
    if tokens.ndim != 1:
        raise UserError(f"mask takes one sequence shaped [length], got shape {tokens.shape}; "
                        "use mask_batch for [batch, length].")
    tokens = tokens.astype(jnp.int32)
    length, slots = tokens.shape[0], config.max_predictions
    # All randomness in one draw (see uniforms_from_bits), only the rows this recipe uses:
    # span priorities and per-span draws, span lengths, per-token decisions, random ids.
    span_rows = 3 if config.spans.max_length > 1 else 2
    token_spans = config.spans.max_length == 1 and word_starts is None
    own_decision = not (config.replace_per_span or token_spans)
    rows = span_rows + own_decision + (config.random_fraction > 0)
    bits = jax.random.bits(key, (rows, length), jnp.uint32)
    uniforms = uniforms_from_bits(bits[:span_rows + own_decision])
    eligible = jnp.ones((length,), bool)
    for special in config.special_ids:
        eligible = eligible & (tokens != special)
    budget = prediction_budget(eligible, config.rate, slots)
    chosen = select_spans(uniforms[:span_rows], eligible, word_starts, config.spans, budget,
                          slots)
    selected = chosen["selected"]

    decide = uniforms[span_rows] if own_decision else chosen["span_draw"]
    to_mask = selected & (decide < config.mask_fraction)
    to_random = selected & ~to_mask & (decide < config.mask_fraction + config.random_fraction)
    inputs = jnp.where(to_mask, config.mask_id, tokens)
    if config.random_fraction > 0:
        inputs = jnp.where(to_random, _random_tokens(bits[-1], config), inputs)

    # Slots: the selected positions in order (a cumsum gives each its slot), then zeros.
    slot = jnp.where(selected, jnp.cumsum(selected, dtype=jnp.int32) - 1, slots)
    positions = jnp.zeros((slots,), jnp.int32).at[slot].set(
        jnp.arange(length, dtype=jnp.int32), mode="drop")
    filled = jnp.arange(slots) < selected.sum()
    out = {
        "inputs": inputs,
        "targets": tokens,
        "weights": selected.astype(jnp.float32),
        "positions": positions,
        "position_targets": jnp.where(filled, tokens[positions], 0),
        "position_weights": filled.astype(jnp.float32),
    }
    if config.span_boundaries:
        start, end = chosen["span_start"][positions], chosen["span_end"][positions]
        out["span_left"] = jnp.where(filled, jnp.clip(start - 1, 0, length - 1), 0)
        out["span_right"] = jnp.where(filled, jnp.clip(end + 1, 0, length - 1), 0)
        out["span_offset"] = jnp.where(filled, positions - start, 0)
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def mask_batch(key: jax.Array, tokens: jax.Array, config: MaskingConfig,
               word_starts: jax.Array | None = None) -> dict[str, jax.Array]:
    """``mask`` over the rows of ``tokens`` [batch, L], one key per row split from ``key``.

    Jitted so eager callers compile once per shape; inside the train step it is inlined.
    """
    if tokens.ndim != 2:
        raise UserError(f"mask_batch takes tokens shaped [batch, length], got {tokens.shape}.")
    keys = jax.random.split(key, tokens.shape[0])
    row = functools.partial(mask, config=config)
    if word_starts is None:
        return jax.vmap(lambda k, t: row(k, t))(keys, tokens)
    return jax.vmap(lambda k, t, w: row(k, t, word_starts=w))(keys, tokens, word_starts)
