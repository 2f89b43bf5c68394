"""MLM objectives measured over thousands of sequences against the published recipes (BERT,
Devlin et al. 2019 §3.1; ALBERT, Lan et al. 2020 §4.1; SpanBERT, Joshi et al. 2020 §3.1;
ELECTRA's public code, ``pretrain_helpers.mask``; values in ``objectives/masking.py``).

Bounds: a proportion p estimated from N independent draws has standard deviation
sqrt(p (1 - p) / N); tests allow 5 of them (a false alarm about once in 1.7 million per check).
Counts are compared with their expectations within 5 sqrt(expected) (Poisson; spans within a
row compete for one budget, so their counts vary less than that and the bound is loose-safe).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.errors import UserError
from t5x_like.objectives import (
    MaskingConfig,
    SpanLengths,
    albert_masking,
    bert_masking,
    electra_masking,
    mask,
    mask_batch,
    sample_replacements,
    sample_span_lengths,
    spanbert_masking,
    word_start_table,
)

VOCAB = 30000
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (CLS, SEP, MASK)
FIRST = 10  # ordinary ids start here in the synthetic sequences


def budget(n, max_predictions, rate=0.15):
    """BERT's reference count (Python's round), capped by the eligible tokens."""
    return min(max_predictions, max(1, int(round(n * rate))), n)


def single_segment(length, n):
    """[CLS] n distinct ordinary tokens [SEP] then padding: position p holds FIRST + p - 1."""
    row = np.zeros(length, np.int32)
    row[0], row[1:n + 1], row[n + 1] = CLS, np.arange(FIRST, FIRST + n), SEP
    return row


def random_pairs(rng, rows, length):
    """[CLS] A [SEP] B [SEP] pad..., random segment lengths and random ordinary ids."""
    out = np.zeros((rows, length), np.int32)
    for r in range(rows):
        total = rng.integers(0, length - 2)
        a = rng.integers(0, total + 1)
        ids = rng.integers(FIRST, VOCAB, total)
        row = [CLS, *ids[:a], SEP, *ids[a:], SEP][:length]
        out[r, :len(row)] = row
    return out


def spans_of(out, row):
    """{(left, right)} of the selected spans of one row (needs span_boundaries)."""
    keep = np.asarray(out["position_weights"][row]) > 0
    left, right = np.asarray(out["span_left"][row])[keep], np.asarray(out["span_right"][row])[keep]
    return set(zip(left.tolist(), right.tolist(), strict=True))


def budget_cut_expectation(probs, k):
    """Expected number of observed spans of each length per row, from the recipe alone.

    Spans with i.i.d. lengths X ~ probs fill a budget of k tokens in random order; the one that
    would overflow is cut to the remainder. With S_j the total of the first j spans,
    u(m) = sum_j P(S_j = m) and U(m) = sum_{i<=m} u(i), a span of length n is kept whole
    p_n U(k - n) times on average, and a cut span has length n u(k - n) P(X > n) times.
    """
    u = np.zeros(k + 1)
    u[0] = 1.0
    for m in range(1, k + 1):
        u[m] = sum(p * u[m - n] for n, p in enumerate(probs, 1) if n <= m)
    renewals, tail = np.cumsum(u), 1.0 - np.cumsum(probs)
    return np.array([p * renewals[k - n] + u[k - n] * tail[n - 1]
                     for n, p in enumerate(probs, 1)])


BERT = bert_masking(VOCAB, MASK, SPECIAL, 20)
SPANBERT = spanbert_masking(VOCAB, MASK, SPECIAL, 20)
# Every test masking 128-token rows uses these 4096 rows (one compilation per config).
PAIRS = random_pairs(np.random.default_rng(0), 4096, 128)


@pytest.fixture(scope="module")
def bert_sample():
    """PAIRS (random segment and padding lengths) masked with the BERT recipe."""
    out = jax.tree.map(np.asarray, mask_batch(jax.random.key(0), jnp.asarray(PAIRS), BERT))
    return PAIRS, out


def test_bert_budget_is_the_reference_count_and_specials_never_selected(bert_sample):
    tokens, out = bert_sample
    eligible = ~np.isin(tokens, [PAD, CLS, SEP, MASK])
    selected = out["weights"] > 0
    expected = [budget(int(n), 20) for n in eligible.sum(1)]
    assert selected.sum(1).tolist() == expected
    assert not (selected & ~eligible).any(), "a special token or padding was selected"
    # The loss covers every selected position, also the ones left unchanged.
    changed = out["inputs"] != tokens
    assert not (changed & ~selected).any()
    assert (selected & ~changed).sum() > 0.09 * selected.sum()
    np.testing.assert_array_equal(out["targets"], tokens)


def test_positions_slots_match_weights(bert_sample):
    tokens, out = bert_sample
    for row in range(0, 4096, 7):
        chosen = np.nonzero(out["weights"][row])[0]
        count = len(chosen)
        np.testing.assert_array_equal(out["positions"][row, :count], chosen)
        assert (out["positions"][row, count:] == 0).all()
        np.testing.assert_array_equal(out["position_weights"][row], np.arange(20) < count)
        np.testing.assert_array_equal(out["position_targets"][row, :count], tokens[row, chosen])


def test_bert_80_10_10(bert_sample):
    tokens, out = bert_sample
    selected = out["weights"] > 0
    total = selected.sum()
    inputs, originals = out["inputs"][selected], tokens[selected]
    allowed = VOCAB - 4  # random ids: the vocabulary minus pad, CLS, SEP and MASK
    shares = {
        "mask": ((inputs == MASK).mean(), 0.8),
        "random": (((inputs != MASK) & (inputs != originals)).mean(), 0.1 * (1 - 1 / allowed)),
        "kept": ((inputs == originals).mean(), 0.1 + 0.1 / allowed),
    }
    for name, (seen, p) in shares.items():
        assert abs(seen - p) < 5 * np.sqrt(p * (1 - p) / total), (name, seen, p)
    assert not np.isin(inputs[inputs != MASK], [PAD, CLS, SEP]).any()


def test_selection_is_uniform_over_eligible_positions():
    n, rows = 126, 4096
    tokens = jnp.asarray(np.tile(single_segment(128, n), (rows, 1)))
    weights = np.asarray(mask_batch(jax.random.key(1), tokens, BERT)["weights"])
    p = budget(n, 20) / n
    per_position = weights[:, 1:n + 1].mean(0)
    assert np.abs(per_position - p).max() < 5 * np.sqrt(p * (1 - p) / rows)
    assert weights[:, [0, n + 1]].sum() == 0


def test_random_tokens_are_uniform_over_the_allowed_range():
    # Ids 3..12, minus MASK (3) and the special id 7: 8 values, each 1/8 of the random draws.
    config = MaskingConfig(VOCAB, MASK, (CLS, SEP, 7), 40, mask_fraction=0.0,
                           random_fraction=1.0, random_range=(3, 13))
    tokens = jnp.asarray(np.tile(single_segment(256, 254), (512, 1)))
    out = mask_batch(jax.random.key(2), tokens, config)
    drawn = np.asarray(out["inputs"])[np.asarray(out["weights"]) > 0]
    values, counts = np.unique(drawn, return_counts=True)
    assert values.tolist() == [4, 5, 6, 8, 9, 10, 11, 12]
    expected = len(drawn) / 8
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * 7 / 8)


def test_whole_words_are_selected_whole_within_the_budget():
    tokens, (rows, length) = PAIRS, PAIRS.shape
    starts = np.random.default_rng(3).random((rows, length)) < 0.6  # words of 1.67 pieces
    out = mask_batch(jax.random.key(4), jnp.asarray(tokens), BERT, jnp.asarray(starts))
    weights = np.asarray(out["weights"]) > 0
    eligible = ~np.isin(tokens, [PAD, *SPECIAL])
    short = []
    for r in range(rows):
        # A word: an eligible start (or the first token after a special) + its continuations.
        opens = eligible[r] & (starts[r] | ~np.r_[False, eligible[r, :-1]])
        word = np.cumsum(opens)
        for w in np.unique(word[eligible[r] & weights[r]]):
            assert weights[r, eligible[r] & (word == w)].all(), "a word was split"
        assert not (weights[r] & ~eligible[r]).any()
        k = budget(int(eligible[r].sum()), 20)
        longest = np.bincount(word[eligible[r]]).max() if eligible[r].any() else 1
        assert k - longest < weights[r].sum() <= k
        short.append(k - weights[r].sum())
    # The rate stays close to 15%: on average the budget is missed by under one word.
    assert 0 < np.mean(short) < 1.0


def test_ngram_span_lengths_follow_one_over_n():
    probs = SpanLengths("ngram", 3).probabilities()
    np.testing.assert_allclose(probs, [6 / 11, 3 / 11, 2 / 11])
    draws = np.asarray(sample_span_lengths(jax.random.key(5), (200_000,), SpanLengths("ngram", 3)))
    counts = np.bincount(draws, minlength=4)[1:]
    assert counts.sum() == 200_000
    expected = probs * 200_000
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - probs)))

    # End to end: the spans found in masked sequences, against the budget-cut expectation.
    rows, length = 2048, 256
    tokens = jnp.asarray(np.tile(single_segment(length, length - 2), (rows, 1)))
    config = albert_masking(VOCAB, MASK, SPECIAL, 40, span_boundaries=True)
    out = jax.tree.map(np.asarray, mask_batch(jax.random.key(6), tokens, config))
    k = budget(length - 2, 40)
    observed = np.zeros(3)
    for r in range(rows):
        assert out["weights"][r].sum() == k  # token spans fill the budget exactly
        for left, right in spans_of(out, r):
            observed[right - left - 2] += 1
    expected = budget_cut_expectation(probs, k) * rows
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected))


def test_spanbert_geometric_lengths_mean_3_8_and_at_most_10():
    lengths = SpanLengths("geometric", 10, 0.2)
    assert abs(lengths.mean() - 3.8) < 0.01  # the paper's mean: geometric(0.2) renormalised
    draws = np.asarray(sample_span_lengths(jax.random.key(7), (200_000,), lengths))
    assert draws.min() == 1 and draws.max() == 10
    var = np.dot((np.arange(1, 11) - lengths.mean()) ** 2, lengths.probabilities())
    assert abs(draws.mean() - lengths.mean()) < 5 * np.sqrt(var / 200_000)
    # The tiling starts with what remains of a span from a random word on: P(m) = P(X >= m) / mean.
    rest = np.asarray(sample_span_lengths(jax.random.key(70), (200_000,), lengths, residual=True))
    tail = lengths.probabilities()[::-1].cumsum()[::-1] / lengths.mean()
    counts = np.bincount(rest, minlength=11)[1:]
    assert np.all(np.abs(counts - 200_000 * tail) < 5 * np.sqrt(200_000 * tail * (1 - tail)))

    rows, length = 1024, 512
    tokens = jnp.asarray(np.tile(single_segment(length, length - 2), (rows, 1)))
    config = spanbert_masking(VOCAB, MASK, SPECIAL, 80)
    out = jax.tree.map(np.asarray, mask_batch(jax.random.key(8), tokens, config))
    k = budget(length - 2, 80)
    observed = np.zeros(10)
    for r in range(rows):
        for left, right in spans_of(out, r):
            observed[right - left - 2] += 1
    expected = budget_cut_expectation(lengths.probabilities(), k) * rows
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected))
    seen_mean = np.dot(np.arange(1, 11), observed) / observed.sum()
    assert 3.5 < seen_mean < lengths.mean()  # the budget cut shortens one span per row


def test_spanbert_boundaries_offsets_and_one_treatment_per_span():
    rng = np.random.default_rng(9)
    rows, length = 1024, 256
    tokens = np.tile(single_segment(length, length - 2), (rows, 1))
    starts = rng.random((rows, length)) < 0.7
    config = spanbert_masking(VOCAB, MASK, SPECIAL, 40)
    out = jax.tree.map(np.asarray, mask_batch(jax.random.key(10), jnp.asarray(tokens), config,
                                              jnp.asarray(starts)))
    masked_spans = spans_total = 0
    for r in range(rows):
        keep = out["position_weights"][r] > 0
        pos, offset = out["positions"][r][keep], out["span_offset"][r][keep]
        words = np.cumsum(starts[r] | (np.arange(length) == 1))
        for left, right in spans_of(out, r):
            inside = np.arange(left + 1, right)
            here = (pos > left) & (pos < right)
            np.testing.assert_array_equal(pos[here], inside)  # a span is contiguous ...
            np.testing.assert_array_equal(offset[here], np.arange(len(inside)))
            assert len(np.unique(words[inside])) <= 10  # ... of at most 10 whole words
            assert starts[r, right] or tokens[r, right] == SEP  # it ends at a word end
            is_mask = out["inputs"][r][inside] == MASK
            assert is_mask.all() or not is_mask.any(), "80/10/10 is decided per span"
            masked_spans += int(is_mask.all())
            spans_total += 1
    assert abs(masked_spans / spans_total - 0.8) < 5 * np.sqrt(0.16 / spans_total)


def test_electra_masking_has_no_random_tokens():
    tokens = PAIRS
    config = electra_masking(VOCAB, MASK, SPECIAL, 20)
    out = jax.tree.map(np.asarray, mask_batch(jax.random.key(12), jnp.asarray(tokens), config))
    selected = out["weights"] > 0
    inputs = out["inputs"][selected]
    assert ((inputs == MASK) | (inputs == tokens[selected])).all()
    share = (inputs == MASK).mean()
    assert abs(share - 0.85) < 5 * np.sqrt(0.85 * 0.15 / selected.sum())


def test_electra_correct_guess_counts_as_original():
    config = electra_masking(VOCAB, MASK, SPECIAL, 20)
    masked = mask_batch(jax.random.key(14), jnp.asarray(PAIRS), config)
    masked = {name: value[:32] for name, value in masked.items()}  # logits: 32 x 20 x VOCAB
    tokens = jnp.asarray(PAIRS[:32])
    targets = masked["position_targets"]
    right = jax.nn.one_hot(targets, VOCAB) * 1e4  # the generator is sure and right ...
    wrong = jax.nn.one_hot((targets + 1) % VOCAB, VOCAB) * 1e4  # ... or sure and wrong
    keys = jax.random.split(jax.random.key(15), 32)
    run = jax.jit(jax.vmap(sample_replacements))
    real = np.asarray(tokens) != PAD
    good = run(keys, tokens, masked["positions"], masked["position_weights"], right)
    np.testing.assert_array_equal(good["inputs"], tokens)
    assert np.asarray(good["labels"]).sum() == 0
    np.testing.assert_array_equal(good["weights"], real)
    bad = run(keys, tokens, masked["positions"], masked["position_weights"], wrong)
    np.testing.assert_array_equal(bad["labels"], np.asarray(masked["weights"]))
    assert (np.asarray(bad["inputs"]) != np.asarray(tokens)).sum() == masked["weights"].sum()


def test_electra_samples_follow_the_generator_softmax():
    probs = np.array([0.5, 0.3, 0.2])
    logits = jnp.tile(jnp.log(jnp.asarray(probs)), (100, 1))
    tokens = jnp.arange(10, 110, dtype=jnp.int32)
    positions, weights = jnp.arange(100), jnp.ones(100)
    keys = jax.random.split(jax.random.key(16), 200)
    out = jax.vmap(sample_replacements, in_axes=(0, None, None, None, None))(
        keys, tokens, positions, weights, logits)
    counts = np.bincount(np.asarray(out["sampled"]).ravel(), minlength=3)
    n = 20_000
    assert np.all(np.abs(counts / n - probs) < 5 * np.sqrt(probs * (1 - probs) / n))


def test_empty_slots_write_nothing():
    tokens = jnp.asarray(single_segment(16, 3))
    logits = jax.nn.one_hot(jnp.full((4,), 99), VOCAB) * 1e4
    out = sample_replacements(jax.random.key(0), tokens, jnp.array([2, 0, 0, 0]),
                              jnp.array([1.0, 0, 0, 0]), logits)
    assert np.asarray(out["inputs"]).tolist() == [CLS, FIRST, 99, FIRST + 2, SEP] + [0] * 11
    assert np.asarray(out["labels"]).tolist() == [0, 0, 1] + [0] * 13


@pytest.mark.parametrize("config", [BERT, SPANBERT], ids=["bert", "spanbert"])
def test_same_key_repeats_new_step_differs(config):
    seed = jax.random.key(3)
    a = mask_batch(jax.random.fold_in(seed, 5), jnp.asarray(PAIRS), config)
    b = mask_batch(jax.random.fold_in(seed, 5), jnp.asarray(PAIRS), config)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    # 126 eligible tokens, 19 predicted: two independent masks (even of spans) coincide with a
    # vanishing probability, so every row must change with the step and differ from the others.
    rows = jnp.asarray(np.tile(single_segment(128, 126), (4096, 1)))
    step_5 = np.asarray(mask_batch(jax.random.fold_in(seed, 5), rows, config)["weights"])
    step_6 = np.asarray(mask_batch(jax.random.fold_in(seed, 6), rows, config)["weights"])
    assert (step_5 != step_6).any(1).all()
    assert len({w.tobytes() for w in step_5}) == 4096  # one key per row


def test_jit_with_traced_step_and_vmap_agree_with_one_row():
    tokens = jnp.asarray(PAIRS[:8])
    seed = jax.random.key(3)
    step = jax.jit(lambda s, t: mask_batch(jax.random.fold_in(seed, s), t, SPANBERT))
    inside = step(jnp.int32(5), tokens)
    eager = mask_batch(jax.random.fold_in(seed, 5), tokens, SPANBERT)
    keys = jax.random.split(jax.random.fold_in(seed, 5), 8)
    row_3 = jax.jit(mask, static_argnames="config")(keys[3], tokens[3], config=SPANBERT)
    for name in inside:
        np.testing.assert_array_equal(inside[name], eager[name])
        np.testing.assert_array_equal(row_3[name], inside[name][3])


@pytest.mark.parametrize("length,slots", [(64, 10), (128, 20), (512, 80)])
def test_output_shapes_are_static(length, slots):
    config = spanbert_masking(VOCAB, MASK, SPECIAL, slots)
    shapes = jax.eval_shape(lambda k, t: mask_batch(k, t, config), jax.random.key(0),
                            jax.ShapeDtypeStruct((4, length), jnp.int32))
    for name in ("inputs", "targets", "weights"):
        assert shapes[name].shape == (4, length)
    for name in ("positions", "position_targets", "position_weights", "span_left",
                 "span_right", "span_offset"):
        assert shapes[name].shape == (4, slots)


def test_shapes_do_not_depend_on_content():
    full = np.tile(single_segment(128, 126), (4096, 1))
    empty = np.tile(single_segment(128, 0), (4096, 1))
    full = mask_batch(jax.random.key(0), jnp.asarray(full), BERT)
    empty = mask_batch(jax.random.key(0), jnp.asarray(empty), BERT)
    assert jax.tree.map(jnp.shape, full) == jax.tree.map(jnp.shape, empty)
    assert float(empty["weights"].sum()) == 0.0 and float(empty["position_weights"].sum()) == 0


def test_word_start_tables():
    wordpiece = ["[PAD]", "[CLS]", "play", "##ing", ",", "##s"]
    assert word_start_table(wordpiece, "wordpiece").tolist() == [1, 1, 1, 0, 1, 0]
    pieces = ["<pad>", "</s>", "\u2581the", "s", ",", "<0xE2>", "<extra_id_0>", "\u2581"]
    assert word_start_table(pieces, "sentencepiece").tolist() == [1, 1, 1, 0, 1, 0, 1, 1]
    with pytest.raises(UserError, match="style"):
        word_start_table(pieces, "bpe")


def test_bad_configs_stop_with_a_sentence():
    with pytest.raises(UserError, match="mask_id"):
        bert_masking(100, 100, SPECIAL, 20)
    with pytest.raises(UserError, match="sum to at most 1"):
        bert_masking(VOCAB, MASK, SPECIAL, 20, mask_fraction=0.9, random_fraction=0.2)
    with pytest.raises(UserError, match="random_range"):
        bert_masking(VOCAB, MASK, SPECIAL, 20, random_range=(1, 4))
    with pytest.raises(UserError, match="max_predictions"):
        bert_masking(VOCAB, MASK, SPECIAL, 0)
    with pytest.raises(UserError, match="kind"):
        SpanLengths("poisson", 3)
    with pytest.raises(UserError, match="one sequence"):
        mask(jax.random.key(0), jnp.ones((2, 8), jnp.int32), bert_masking(VOCAB, MASK, (), 2))
