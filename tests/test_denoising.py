"""BART noising: each function alone and composed, exact budgets, Poisson(3) spans, invariants.

Rows are ``[BOS] distinct tokens [EOS] pad...`` so every surviving token can be traced back to
its original position. Statistical bounds are 5 binomial standard errors (a false alarm has
probability ~6e-7 per check; the keys are fixed, so the tests are deterministic anyway).
"""

import functools
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.errors import UserError
from t5x_like.objectives import (
    BART_PAPER,
    BartNoise,
    TokenIds,
    bart_noise,
    document_rotation,
    sentence_permutation,
    text_infilling,
    token_deletion,
    token_masking,
)

PAD, EOS, BOS, MASK, STOP = 0, 1, 2, 3, 4
VOCAB = 1000
IDS = TokenIds(mask=MASK, eos=EOS, bos=BOS, pad=PAD, vocab_size=VOCAB)
FIRST_ORDINARY = 5


def rows_of(seed: int, count: int, length: int, low: int, high: int) -> np.ndarray:
    """``count`` rows ``[BOS] body [EOS] pad`` with body lengths in [low, high] of distinct ids."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, length), np.int32)
    for r in range(count):
        m = rng.integers(low, high + 1)
        out[r, 0] = BOS
        out[r, 1 : m + 1] = rng.permutation(np.arange(FIRST_ORDINARY, VOCAB))[:m]
        out[r, m + 1] = EOS
    return out


def body_of(row) -> list[int]:
    row = [int(t) for t in row if t != PAD]
    assert row[0] == BOS and row[-1] == EOS
    return row[1:-1]


@functools.cache
def batched(fn, **kwargs):
    """``fn`` vmapped over rows (one key each) under jit, built once per setting."""
    return jax.jit(jax.vmap(lambda k, t: fn(k, t, IDS, **kwargs)))


def run(fn, seed: int, tokens: np.ndarray, **kwargs):
    keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
    return jax.tree.map(np.asarray, batched(fn, **kwargs)(keys, jnp.asarray(tokens)))


def infill_spans(original, noised) -> list[int]:
    """Span lengths, left to right, of one infilled row: every <mask> must sit between two
    survivors (kept in order) and stand for exactly the tokens between them; survivors not
    separated by a <mask> must have been neighbours."""
    where = {tok: i for i, tok in enumerate(int(t) for t in original if t != PAD)}
    spans, previous, pending = [], None, False
    for tok in (int(t) for t in noised if t != PAD):
        if tok == MASK:
            assert not pending, "two <mask>es in a row: spans must be separated"
            assert previous is not None, "a <mask> before BOS"
            pending = True
            continue
        p = where.pop(tok)  # KeyError: an unknown or repeated token
        if previous is not None:
            gap = p - previous - 1
            assert gap >= 0, "survivors out of order"
            if pending:
                spans.append(gap)
            else:
                assert gap == 0, "tokens vanished without a <mask>"
        pending, previous = False, p
    assert not pending, "a <mask> after EOS"
    return spans


# ------------------------------------------------------------------------------ token masking
def test_token_masking_exact_count_and_only_body_tokens():
    tokens = rows_of(0, 64, 48, 1, 46)
    noised = run(token_masking, 1, tokens, rate=0.3)
    assert noised.shape == tokens.shape
    for orig, new in zip(tokens, noised, strict=True):
        m = len(body_of(orig))
        changed = orig != new
        assert changed.sum() == round(0.3 * m)
        assert (new[changed] == MASK).all()
        assert new[0] == BOS and (new[orig == EOS] == EOS).all() and (new[orig == PAD] == PAD).all()


def test_token_masking_random_replacement_share():
    tokens = rows_of(2, 256, 130, 128, 128)
    noised = run(token_masking, 3, tokens, rate=0.3, random_ratio=0.1)
    changed = noised[tokens != noised]
    selected = 256 * round(0.3 * 128)
    # A random replacement equal to the original token looks unchanged: 1/995 of them.
    random_share = (changed != MASK).sum() / selected
    assert abs(random_share - 0.1) < 5 * math.sqrt(0.1 * 0.9 / selected)
    replacements = changed[changed != MASK]
    assert not np.isin(replacements, [PAD, EOS, BOS, MASK]).any()
    assert replacements.min() >= 0 and replacements.max() < VOCAB


# ------------------------------------------------------------------------------ deletion
def test_token_deletion_keeps_survivor_order_and_count():
    tokens = rows_of(4, 64, 40, 1, 38)
    noised = run(token_deletion, 5, tokens, rate=0.25)
    assert noised.shape == tokens.shape
    for orig, new in zip(tokens, noised, strict=True):
        body, kept = body_of(orig), body_of(new)
        assert len(body) - len(kept) == round(0.25 * len(body))
        it = iter(body)
        assert all(tok in it for tok in kept), "survivors are not a subsequence of the body"
        assert (new[len(kept) + 2 :] == PAD).all()


# ------------------------------------------------------------------------------ infilling
@pytest.fixture(scope="module")
def infilled():
    """1000 rows with bodies of 200..250 tokens, infilled at 30%, decoded into span lengths."""
    tokens = rows_of(8, 1000, 256, 200, 250)
    noised = run(text_infilling, 9, tokens, rate=0.3)
    assert noised.shape == tokens.shape
    spans = [infill_spans(orig, new) for orig, new in zip(tokens, noised, strict=True)]
    return tokens, noised, spans


def test_text_infilling_budget_and_one_mask_per_span(infilled):
    tokens, noised, spans = infilled
    masked = maskable = 0
    for orig, new, row_spans in zip(tokens, noised, spans, strict=True):
        m = len(body_of(orig))
        assert sum(row_spans) == round(0.3 * m)  # the budget, exactly
        assert (new == MASK).sum() == len(row_spans)
        masked, maskable = masked + sum(row_spans), maskable + m
    # Rounding per row moves the share by at most half a token per row.
    assert abs(masked / maskable - 0.3) <= 0.5 * len(tokens) / maskable


def test_text_infilling_span_lengths_are_poisson_3(infilled):
    # Budgets of 60..75 tokens. The first 10 spans of a row are untouched draws unless 10
    # Poisson(3) lengths (a Poisson(30) sum) already reach 60 (P ~ 1e-6): exactly Poisson(3).
    first = 10
    lengths = np.array([length for row in infilled[2] for length in row[:first]])
    n = len(infilled[2]) * first
    assert len(lengths) == n
    assert abs(lengths.mean() - 3.0) < 5 * math.sqrt(3.0 / n)
    for k in range(9):
        pmf = math.exp(-3.0) * 3.0**k / math.factorial(k)
        assert abs((lengths == k).mean() - pmf) < 5 * math.sqrt(pmf * (1 - pmf) / n), k
    assert (lengths == 0).sum() > 0  # zero-length spans do occur, each one inserted <mask>


def test_text_infilling_short_rows_stay_decodable():
    # Tiny bodies, no padding to spare, rate 0.5: zero-length spans must still fit in the row
    # and stay separated (extra ones are dropped; positive spans always fit at rate <= 0.5).
    tokens = rows_of(10, 512, 10, 0, 8)
    noised = run(text_infilling, 11, tokens, rate=0.5)
    for orig, new in zip(tokens, noised, strict=True):
        assert sum(infill_spans(orig, new)) == round(0.5 * len(body_of(orig)))


def test_text_infilling_random_ratio_and_eos_inside():
    # An EOS between two packed documents is never masked; a random replacement never
    # produces a special id.
    tokens = rows_of(12, 64, 64, 60, 60)
    tokens[:, 30] = EOS
    noised = run(text_infilling, 13, tokens, rate=0.3, random_ratio=0.5)
    assert ((noised == EOS).sum(axis=1) == 2).all()
    fills = noised[~np.isin(noised, tokens)]
    assert fills.size > 0 and not np.isin(fills, [PAD, EOS, BOS]).any()


# ------------------------------------------------------------------------------ permutation
def sentences_of(row, ends) -> list[tuple[int, ...]]:
    out, current = [], []
    for tok, end in zip(row, ends, strict=True):
        current.append(int(tok))
        if end:
            out.append(tuple(current))
            current = []
    return out + ([tuple(current)] if current else [])


def test_sentence_permutation_keeps_sentences_and_is_uniform():
    # Three sentences of lengths 2, 3, 4 given by a boolean array; 6 orders equally likely.
    rows = 3000
    body = np.arange(10, 19)
    row = np.concatenate([[BOS], body, [EOS], [PAD] * 3]).astype(np.int32)
    ends = np.zeros_like(row, bool)
    ends[[2, 5]] = True  # the body's last token closes the third sentence by itself
    tokens = np.tile(row, (rows, 1))
    keys = jax.random.split(jax.random.key(14), rows)
    f = jax.jit(jax.vmap(lambda k, t: sentence_permutation(k, t, IDS, sentence_ends=ends)))
    noised = np.asarray(f(keys, jnp.asarray(tokens)))
    sentences = [(10, 11), (12, 13, 14), (15, 16, 17, 18)]
    orders = Counter()
    for new in noised:
        assert new[0] == BOS and new[10] == EOS and (new[11:] == PAD).all()
        pieces, rest = [], list(new[1:10])
        while rest:  # split the body back into whole sentences, each intact
            s = next(s for s in sentences if tuple(rest[: len(s)]) == s)
            pieces.append(sentences.index(s))
            rest = rest[len(s) :]
        assert sorted(pieces) == [0, 1, 2]
        orders[tuple(pieces)] += 1
    assert len(orders) == 6
    for count in orders.values():
        assert abs(count / rows - 1 / 6) < 5 * math.sqrt((1 / 6) * (5 / 6) / rows)


def test_sentence_permutation_by_end_ids_keeps_multiset_of_sentences():
    ids = TokenIds(mask=MASK, eos=EOS, bos=BOS, pad=PAD, sentence_end=(STOP,))
    tokens = rows_of(15, 64, 40, 5, 38)
    rng = np.random.default_rng(16)
    tokens[:, 1:-1][(rng.random((64, 38)) < 0.2) & (tokens[:, 1:-1] >= FIRST_ORDINARY)] = STOP
    keys = jax.random.split(jax.random.key(17), 64)
    noised = np.asarray(
        jax.jit(jax.vmap(lambda k, t: sentence_permutation(k, t, ids)))(keys, jnp.asarray(tokens))
    )
    moved = 0
    for orig, new in zip(tokens, noised, strict=True):
        a, b = body_of(orig), body_of(new)
        assert len(a) == len(b) and new[0] == BOS
        ends = [t == STOP for t in a]
        ends[-1] = True  # the body's last token closes the last sentence
        left = Counter(sentences_of(a, ends))
        while b:  # b must split into the same sentences; a sentence's first token names it
            s = next(s for s in left if left[s] and tuple(b[: len(s)]) == s)
            left[s] -= 1
            b = b[len(s) :]
        assert not +left
        moved += a != body_of(new)
    assert moved > 32


def test_sentence_permutation_needs_sentence_ends():
    with pytest.raises(UserError, match="sentence ends"):
        sentence_permutation(jax.random.key(0), jnp.asarray(rows_of(0, 1, 8, 4, 4)[0]), IDS)


# ------------------------------------------------------------------------------ rotation
def test_document_rotation_is_a_uniform_rotation_of_the_body():
    rows, m = 2200, 11
    tokens = rows_of(18, rows, 16, m, m)
    noised = run(document_rotation, 19, tokens)
    offsets = Counter()
    for orig, new in zip(tokens, noised, strict=True):
        assert Counter(orig.tolist()) == Counter(new.tolist())  # the token multiset
        assert new[0] == BOS and new[m + 1] == EOS
        a, b = body_of(orig), body_of(new)
        k = a.index(b[0])
        assert b == a[k:] + a[:k]
        offsets[k] += 1
    assert len(offsets) == m
    for count in offsets.values():
        assert abs(count / rows - 1 / m) < 5 * math.sqrt((1 / m) * (1 - 1 / m) / rows)


def test_document_rotation_rate():
    rows, m = 2000, 9
    tokens = rows_of(20, rows, 12, m, m)
    noised = run(document_rotation, 21, tokens, rate=0.5)
    changed = (noised != tokens).any(axis=1).mean()
    p = 0.5 * (1 - 1 / m)  # offset 0 leaves the row as it was
    assert abs(changed - p) < 5 * math.sqrt(p * (1 - p) / rows)
    np.testing.assert_array_equal(run(document_rotation, 21, tokens, rate=0.0), tokens)


# ------------------------------------------------------------------------------ composition
def chained(key, tokens, noise, ids, ends, output_length):
    """The documented order, one sub-key per step, applied by hand."""
    k_perm, k_mask, k_del, k_fill, k_rot = jax.random.split(key, 5)
    x = jnp.asarray(tokens)
    if noise.permute_sentences:
        x = sentence_permutation(k_perm, x, ids, sentence_ends=ends)
    if noise.mask_ratio:
        x = token_masking(k_mask, x, ids, rate=noise.mask_ratio, random_ratio=noise.random_ratio)
    if noise.delete_ratio:
        x = token_deletion(k_del, x, ids, rate=noise.delete_ratio)
    x = text_infilling(
        k_fill,
        x,
        ids,
        rate=noise.infill_ratio,
        random_ratio=noise.random_ratio,
        output_length=output_length,
    )
    if noise.rotate_ratio:
        x = document_rotation(k_rot, x, ids, rate=noise.rotate_ratio)
    return x


def test_bart_noise_composes_in_fairseq_order():
    # All five at once (BART_PAPER's two are checked on their own below).
    noise = BartNoise(
        mask_ratio=0.1,
        delete_ratio=0.1,
        infill_ratio=0.2,
        permute_sentences=True,
        rotate_ratio=1.0,
        random_ratio=0.1,
    )
    tokens = rows_of(22, 4, 40, 20, 30)
    ends = np.zeros((40,), bool)
    ends[[4, 9, 15]] = True
    keys = jax.random.split(jax.random.key(100), 4)
    out = jax.jit(
        jax.vmap(lambda k, t: bart_noise(k, t, noise, IDS, sentence_ends=ends, output_length=48))
    )(keys, tokens)
    expected = jax.jit(jax.vmap(lambda k, t: chained(k, t, noise, IDS, ends, 48)))(keys, tokens)
    np.testing.assert_array_equal(out["inputs"], expected)
    np.testing.assert_array_equal(out["targets"], tokens)
    assert out["inputs"].shape == (4, 48) and out["targets"].shape == (4, 40)
    np.testing.assert_array_equal(out["inputs_length"], (np.asarray(expected) != PAD).sum(1))
    np.testing.assert_array_equal(out["targets_length"], (tokens != PAD).sum(1))
    np.testing.assert_array_equal(out["target_weights"], (tokens != PAD).astype(np.float32))


PAPER_ENDS = np.isin(np.arange(64), [8, 20, 33])


@functools.cache
def paper_recipe():
    """BART_PAPER over [64, 64] rows with sentences ending at 8, 20 and 33, compiled once."""
    return jax.jit(
        jax.vmap(lambda k, t: bart_noise(k, t, BART_PAPER, IDS, sentence_ends=PAPER_ENDS))
    )


def test_paper_recipe_properties():
    # Infilling 30% after a sentence permutation: the budget is met exactly, every <mask>
    # stands for one span of the permuted body, and each sentence's survivors stay in order.
    assert BART_PAPER == BartNoise(infill_ratio=0.3, poisson_lambda=3.0, permute_sentences=True)
    tokens = rows_of(23, 64, 64, 40, 60)
    ends = PAPER_ENDS
    keys = jax.random.split(jax.random.key(24), 64)
    out = jax.tree.map(np.asarray, paper_recipe()(keys, jnp.asarray(tokens)))
    g = jax.jit(
        jax.vmap(
            lambda k, t: sentence_permutation(jax.random.split(k, 5)[0], t, IDS, sentence_ends=ends)
        )
    )
    permuted = np.asarray(g(keys, jnp.asarray(tokens)))
    for orig, perm, new in zip(tokens, permuted, out["inputs"], strict=True):
        spans = infill_spans(perm, new)
        assert sum(spans) == round(0.3 * len(body_of(orig)))
        position = {t: i for i, t in enumerate(orig)}
        survivors = [t for t in new if t not in (PAD, MASK, BOS, EOS)]
        cut = np.searchsorted(np.flatnonzero(ends), [position[t] for t in survivors])
        for s in set(cut):
            mine = [position[t] for t, c in zip(survivors, cut, strict=True) if c == s]
            assert mine == sorted(mine)


# ------------------------------------------------------------------------------ keys, jit, spec
def test_same_key_same_output_other_key_differs_and_vmap_matches_single_rows():
    tokens = rows_of(25, 64, 64, 50, 60)
    seed = jax.random.key(3)
    # As in the train step: keys from fold_in(seed, step), one per row.
    keys_a = jax.random.split(jax.random.fold_in(seed, 7), 64)
    keys_b = jax.random.split(jax.random.fold_in(seed, 8), 64)
    a, a2, b = (paper_recipe()(k, tokens)["inputs"] for k in (keys_a, keys_a, keys_b))
    np.testing.assert_array_equal(a, a2)
    assert all(not np.array_equal(a[r], b[r]) for r in range(64))
    # The per-sequence function alone (no vmap) gives the row the batched call gave.
    single = jax.jit(lambda k, t: document_rotation(k, t, IDS))
    rotated = run(document_rotation, 26, tokens)
    keys = jax.random.split(jax.random.key(26), 64)
    for r in (0, 41):
        np.testing.assert_array_equal(single(keys[r], tokens[r]), rotated[r])


def test_output_shapes_are_static():
    def shapes(fn):
        out = jax.eval_shape(fn, jax.random.key(0), jax.ShapeDtypeStruct((7, 32), jnp.int32))
        return jax.tree.map(lambda s: s.shape, out)

    noise = BartNoise(mask_ratio=0.1, delete_ratio=0.1, infill_ratio=0.3, rotate_ratio=0.5)

    def batched(key, tokens):
        keys = jax.random.split(key, tokens.shape[0])
        return jax.vmap(lambda k, t: bart_noise(k, t, noise, IDS, output_length=40))(keys, tokens)

    assert shapes(batched) == {
        "inputs": (7, 40),
        "targets": (7, 32),
        "inputs_length": (7,),
        "targets_length": (7,),
        "target_weights": (7, 32),
    }


def test_spec_and_argument_errors():
    assert BartNoise.from_dict({"infill_ratio": 0.3, "permute_sentences": True}) == BART_PAPER
    with pytest.raises(UserError, match="unknown BART noise"):
        BartNoise.from_dict({"infil_ratio": 0.3})
    with pytest.raises(UserError, match="infill_ratio"):
        BartNoise(infill_ratio=0.6)
    with pytest.raises(UserError, match="poisson_lambda"):
        BartNoise(poisson_lambda=0.0)
    with pytest.raises(UserError, match="must all differ"):
        TokenIds(mask=1, eos=1)
    with pytest.raises(UserError, match="vocab_size"):
        TokenIds(mask=VOCAB, vocab_size=VOCAB)
    assert TokenIds(mask=VOCAB - 1, vocab_size=VOCAB).special == (0, 1, VOCAB - 1)  # BART's
    row = jnp.asarray(rows_of(0, 1, 8, 4, 4)[0])
    with pytest.raises(UserError, match="output_length"):
        text_infilling(jax.random.key(0), row, IDS, rate=0.3, output_length=4)
    with pytest.raises(UserError, match="vocab_size"):
        token_masking(jax.random.key(0), row, TokenIds(mask=MASK), rate=0.3, random_ratio=0.1)
