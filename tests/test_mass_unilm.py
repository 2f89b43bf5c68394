"""MASS fragments (length, layout, 20/20/60 start distribution) and UniLM masks and mixture.

Bounds on frequencies are 5 binomial standard errors (false alarm ~6e-7 per check; the keys
are fixed, so the tests are deterministic anyway).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.errors import UserError
from t5x_like.objectives import (
    TokenIds,
    attention_mask,
    mass_fragment,
    prefix_lm_mask,
    sample_mode,
    unilm_example,
)
from t5x_like.objectives.masking import mask
from t5x_like.objectives.unilm import (
    BIDIRECTIONAL,
    LEFT_TO_RIGHT,
    MODE_PROBS,
    RIGHT_TO_LEFT,
    SEQ2SEQ,
    unilm_masking,
)

PAD, EOS, BOS, MASK = 0, 1, 2, 3
VOCAB = 500
IDS = TokenIds(mask=MASK, eos=EOS, bos=BOS, pad=PAD, vocab_size=VOCAB)
MASKING = unilm_masking(VOCAB, MASK, special_ids=(BOS, EOS), max_predictions=20)


def rows_of(seed: int, count: int, length: int, low: int, high: int) -> np.ndarray:
    """``[BOS] body [EOS] pad`` rows, body lengths in [low, high], distinct ordinary ids."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, length), np.int32)
    for r in range(count):
        m = rng.integers(low, high + 1)
        out[r, 0], out[r, m + 1] = BOS, EOS
        out[r, 1 : m + 1] = rng.permutation(np.arange(4, VOCAB))[:m]
    return out


def within(count: int, total: int, p: float) -> bool:
    return abs(count / total - p) < 5 * math.sqrt(p * (1 - p) / total)


@functools.cache
def mass_batched(**kwargs):
    return jax.jit(jax.vmap(lambda k, t: mass_fragment(k, t, IDS, **kwargs)))


def mass(seed: int, tokens: np.ndarray, **kwargs) -> dict:
    keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
    return jax.tree.map(np.asarray, mass_batched(**kwargs)(keys, jnp.asarray(tokens)))


# ------------------------------------------------------------------------------ MASS
def test_mass_layout_and_fragment_length():
    tokens = rows_of(0, 256, 64, 1, 62)
    out = mass(1, tokens)
    for r, row in enumerate(tokens):
        m = int((row != PAD).sum()) - 2
        length = max(1, round(0.5 * m))  # half of the body, rounded half to even
        first = int(out["fragment_start"][r])
        assert int(out["fragment_length"][r]) == length
        assert 1 <= first and first + length <= m + 1  # inside the body: BOS, EOS untouched
        inside = np.zeros(64, bool)
        inside[first : first + length] = True
        np.testing.assert_array_equal(out["inputs"][r], np.where(inside, MASK, row))
        np.testing.assert_array_equal(out["targets"][r], np.where(inside, row, PAD))
        np.testing.assert_array_equal(out["target_weights"][r], inside.astype(np.float32))
        shifted = np.full(64, MASK)
        shifted[first + 1 : first + length] = row[first : first + length - 1]
        np.testing.assert_array_equal(out["decoder_inputs"][r], shifted)


def test_mass_start_distribution_is_20_20_60():
    # Body of 20: fragments of 10, 11 possible starts. Begin and end each get 0.2 + 0.6 / 11,
    # the 9 starts between them 0.6 / 11 each (the uniform 60% covers all 11).
    rows = 4000
    tokens = rows_of(2, rows, 24, 20, 20)
    offsets = mass(3, tokens)["fragment_start"] - 1
    counts = np.bincount(offsets, minlength=11)
    assert counts.sum() == rows and len(counts) == 11
    assert within(counts[0], rows, 0.2 + 0.6 / 11)
    assert within(counts[10], rows, 0.2 + 0.6 / 11)
    for k in range(1, 10):
        assert within(counts[k], rows, 0.6 / 11), k
    assert within(counts[1:10].sum(), rows, 0.6 * 9 / 11)


def test_mass_start_probs_and_ratio_are_configurable():
    tokens = rows_of(4, 64, 40, 10, 38)
    m = (tokens != PAD).sum(axis=1) - 2
    at_begin = mass(5, tokens, start_probs=(1.0, 0.0, 0.0), fragment_ratio=0.3)
    np.testing.assert_array_equal(at_begin["fragment_start"], 1)
    np.testing.assert_array_equal(at_begin["fragment_length"], np.round(0.3 * m))
    at_end = mass(5, tokens, start_probs=(0.0, 1.0, 0.0))
    np.testing.assert_array_equal(
        at_end["fragment_start"] + at_end["fragment_length"], m + 1
    )  # the fragment ends where the body ends


def test_mass_keys_jit_and_single_row():
    tokens = rows_of(6, 32, 40, 20, 38)
    seed = jax.random.key(0)
    a = mass_batched()(jax.random.split(jax.random.fold_in(seed, 1), 32), tokens)
    a2 = mass_batched()(jax.random.split(jax.random.fold_in(seed, 1), 32), tokens)
    b = mass_batched()(jax.random.split(jax.random.fold_in(seed, 2), 32), tokens)
    np.testing.assert_array_equal(a["inputs"], a2["inputs"])
    assert (np.asarray(a["fragment_start"]) != np.asarray(b["fragment_start"])).any()
    key = jax.random.split(jax.random.fold_in(seed, 1), 32)[7]
    single = jax.jit(lambda k, t: mass_fragment(k, t, IDS))(key, tokens[7])
    for name in single:
        np.testing.assert_array_equal(single[name], a[name][7])


def test_mass_errors():
    row = jnp.asarray(rows_of(0, 1, 8, 4, 4)[0])
    with pytest.raises(UserError, match="fragment_ratio"):
        mass_fragment(jax.random.key(0), row, IDS, fragment_ratio=0.0)
    with pytest.raises(UserError, match="start_probs"):
        mass_fragment(jax.random.key(0), row, IDS, start_probs=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------ UniLM masks
# [BOS a b EOS | c EOS | pad]: source = the first four (segment 0), target = c EOS.
TOKENS = np.array([BOS, 10, 11, EOS, 12, EOS, PAD], np.int32)
SEGMENTS = np.array([0, 0, 0, 0, 1, 1, 0], np.int32)
VALID = TOKENS != PAD


def grid(*rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows])


EXPECTED = {
    BIDIRECTIONAL: grid(
        "1111110", "1111110", "1111110", "1111110", "1111110", "1111110", "0000000"
    ),
    LEFT_TO_RIGHT: grid(
        "1000000", "1100000", "1110000", "1111000", "1111100", "1111110", "0000000"
    ),
    RIGHT_TO_LEFT: grid(
        "1111110", "0111110", "0011110", "0001110", "0000110", "0000010", "0000000"
    ),
    SEQ2SEQ: grid("1111000", "1111000", "1111000", "1111000", "1111100", "1111110", "0000000"),
}


@pytest.mark.parametrize("mode", [BIDIRECTIONAL, LEFT_TO_RIGHT, RIGHT_TO_LEFT, SEQ2SEQ])
def test_masks_equal_hand_written_example(mode):
    np.testing.assert_array_equal(attention_mask(mode, VALID, SEGMENTS), EXPECTED[mode])
    traced = jax.jit(attention_mask)(jnp.int32(mode), VALID, SEGMENTS)  # mode as data
    np.testing.assert_array_equal(traced, EXPECTED[mode])


def test_prefix_lm_is_seq2seq_with_a_prefix():
    np.testing.assert_array_equal(prefix_lm_mask(VALID, 4), EXPECTED[SEQ2SEQ])
    np.testing.assert_array_equal(prefix_lm_mask(VALID, 0), EXPECTED[LEFT_TO_RIGHT])
    np.testing.assert_array_equal(prefix_lm_mask(VALID, 6), EXPECTED[BIDIRECTIONAL])


def test_padding_rows_do_not_make_attention_nan():
    # A padding query sees nothing; dot_product_attention must still give finite outputs.
    x = jax.random.normal(jax.random.key(0), (1, 7, 2, 4))
    for mode in EXPECTED:
        mask = attention_mask(mode, VALID, SEGMENTS)[None, None]
        assert np.isfinite(np.asarray(jax.nn.dot_product_attention(x, x, x, mask=mask))).all()


# ------------------------------------------------------------------------------ UniLM mixture
@functools.cache
def examples(**kwargs):
    return jax.jit(
        jax.vmap(lambda k, t, s: unilm_example(k, t, s, MASKING, **kwargs), in_axes=(0, 0, None))
    )


def test_mode_frequencies_follow_the_mixture():
    draws = 6000
    keys = jax.random.split(jax.random.key(7), draws)
    modes = np.asarray(jax.jit(jax.vmap(sample_mode))(keys))
    counts = np.bincount(modes, minlength=4)
    assert MODE_PROBS == (1 / 3, 1 / 6, 1 / 6, 1 / 3)
    for mode, p in enumerate(MODE_PROBS):
        assert within(counts[mode], draws, p), (mode, counts)
    custom = np.asarray(jax.jit(jax.vmap(lambda k: sample_mode(k, (0.5, 0.0, 0.0, 0.5))))(keys))
    counts = np.bincount(custom, minlength=4)
    assert counts[1] == counts[2] == 0 and within(counts[0], draws, 0.5)


def test_examples_pick_a_mode_per_row_and_its_mask():
    rows = 512
    tokens = np.tile(TOKENS, (rows, 1))
    keys = jax.random.split(jax.random.key(8), rows)
    out = jax.tree.map(np.asarray, examples()(keys, tokens, SEGMENTS))
    assert len(set(out["mode"].tolist())) == 4
    for r in range(rows):
        np.testing.assert_array_equal(out["attention_mask"][r], EXPECTED[int(out["mode"][r])])
    np.testing.assert_array_equal(out["targets"], tokens)
    np.testing.assert_array_equal(out["segment_ids"][0], SEGMENTS)
    # One mode for the whole batch (the paper's per-batch choice): pass it in.
    fixed = examples(mode=SEQ2SEQ)(keys[:4], tokens[:4], SEGMENTS)
    np.testing.assert_array_equal(fixed["attention_mask"], np.stack([EXPECTED[SEQ2SEQ]] * 4))
    again = examples()(keys, tokens, SEGMENTS)
    np.testing.assert_array_equal(again["inputs"], out["inputs"])


def test_examples_use_bert_masking_within_the_15_percent_budget():
    # The corruption is masking.mask's (BERT's), with the row key's second half.
    rows, m = 64, 100
    tokens = rows_of(9, rows, 104, m, m)
    tokens[:, 60] = EOS  # a separator inside the row is never selected either
    segments = (np.arange(104) > 60).astype(np.int32)
    keys = jax.random.split(jax.random.key(10), rows)
    out = jax.tree.map(np.asarray, examples()(keys, tokens, segments))
    direct = jax.jit(jax.vmap(lambda k, t: mask(jax.random.split(k)[1], t, MASKING)))(keys, tokens)
    for name in ("inputs", "weights", "positions", "position_targets"):
        np.testing.assert_array_equal(out[name], direct[name])
    np.testing.assert_array_equal(out["weights"].sum(axis=1), round(0.15 * (m - 1)))
    selected = out["weights"] > 0
    assert not np.isin(tokens[selected], [PAD, BOS, EOS]).any()
    np.testing.assert_array_equal(out["inputs"][~selected], tokens[~selected])
    assert within(int((out["inputs"][selected] == MASK).sum()), int(selected.sum()), 0.8)


def test_unilm_errors():
    with pytest.raises(UserError, match="mode_probs"):
        sample_mode(jax.random.key(0), (0.5, 0.5, 0.5, 0.5))
    with pytest.raises(UserError, match="mode_probs"):
        unilm_example(jax.random.key(0), TOKENS, SEGMENTS, MASKING, mode_probs=(1.0, 0.0))
