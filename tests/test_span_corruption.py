"""T5 span corruption: published lengths, counts, sentinel order, lossless round trip, and the
span-length distribution T5's random segmentation implies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from t5x_like.errors import UserError
from t5x_like.objectives import noise_span_counts, span_corruption, span_corruption_lengths

VOCAB = 8100  # 8000 pieces + 100 extra ids: <extra_id_0> = 8099
FIRST_SENTINEL = VOCAB - 100
EOS = 1


def reference_search(inputs_length, noise_density, mean_noise_span_length):
    """T5's random_spans_helper (extra tokens per span = 1), restated from its definition."""

    def lengths(raw):
        noise = int(round(raw * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return raw - noise + spans + 1, noise + spans + 1

    raw = inputs_length - 1
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    inputs, targets = lengths(raw)
    if noise_density == 0.5 and targets > inputs:
        raw, targets = raw - 1, targets - 1
    return raw, targets


def distinct_tokens(seed, batch, length):
    """Rows of distinct ordinary ids (no EOS, no sentinel), so every token is traceable."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.arange(2, FIRST_SENTINEL))[:length] for _ in range(batch)]
    return jnp.asarray(np.stack(rows), jnp.int32)


def output_shapes(raw_length, batch=2, **settings):
    """Shapes of span_corruption's outputs, traced without compiling."""
    out = jax.eval_shape(
        lambda key, tokens: span_corruption(key, tokens, vocab_size=VOCAB, **settings),
        jax.random.key(0),
        jax.ShapeDtypeStruct((batch, raw_length), jnp.int32),
    )
    assert out["inputs"].dtype == jnp.int32 and out["targets"].dtype == jnp.int32
    return out["inputs"].shape, out["targets"].shape


def decode(inputs, targets):
    """Split one row back into (raw tokens, noise mask, target spans in sentinel order)."""
    inputs, targets = np.asarray(inputs).tolist(), np.asarray(targets).tolist()
    assert inputs[-1] == EOS and targets[-1] == EOS
    assert EOS not in inputs[:-1] and EOS not in targets[:-1]
    spans, sentinels = [], []
    for tok in targets[:-1]:
        if tok >= FIRST_SENTINEL:
            sentinels.append(tok)
            spans.append([])
        else:
            spans[-1].append(tok)  # IndexError if targets do not start with a sentinel
    raw, mask = [], []
    by_sentinel = dict(zip(sentinels, spans, strict=True))
    for tok in inputs[:-1]:
        if tok >= FIRST_SENTINEL:
            raw += by_sentinel.pop(tok)
            mask += [True] * len(spans[sentinels.index(tok)])
        else:
            raw.append(tok)
            mask.append(False)
    assert not by_sentinel, "a target span has no sentinel in the inputs"
    return np.array(raw), np.array(mask), spans


def test_published_t5_lengths():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    assert span_corruption_lengths(512) == (568, 114)
    assert output_shapes(568) == ((2, 512), (2, 114))


@pytest.mark.parametrize(
    "inputs_length,density,mean",
    [
        (128, 0.15, 3.0),
        (256, 0.15, 3.0),
        (1024, 0.15, 3.0),
        (114, 0.15, 3.0),
        (64, 0.15, 3.0),
        (512, 0.5, 3.0),
        (256, 0.5, 3.0),
        (512, 0.3, 3.0),
        (512, 0.15, 8.0),
    ],
)
def test_lengths_match_reference_search_and_outputs(inputs_length, density, mean):
    raw, targets = span_corruption_lengths(inputs_length, density, mean)
    assert (raw, targets) == reference_search(inputs_length, density, mean)
    shapes = output_shapes(raw, noise_density=density, mean_noise_span_length=mean)
    assert shapes == ((2, inputs_length), (2, targets))
    if density != 0.5:  # (at 0.5 the reference may step back one token; tested below)
        # One more raw token would no longer fit: raw really is the largest length.
        longer = output_shapes(raw + 1, noise_density=density, mean_noise_span_length=mean)
        assert longer[0][1] > inputs_length


def test_density_half_adjustment_reports_true_targets_length():
    # At density 0.5, mean 1 the reference lowers the raw length (targets > inputs otherwise);
    # the targets length we report is the one the outputs really have.
    raw, targets = span_corruption_lengths(512, 0.5, 1.0)
    assert raw == reference_search(512, 0.5, 1.0)[0] == 510
    inputs_shape, targets_shape = output_shapes(raw, noise_density=0.5, mean_noise_span_length=1.0)
    assert targets_shape[1] == targets == 511
    assert inputs_shape[1] <= 512


@pytest.mark.parametrize(
    "length,density,mean,num_noise,num_spans",
    [
        (2, 0.15, 3.0, 1, 1),  # clipped up: at least one noise token and one span
        (20, 0.15, 3.0, 3, 1),
        (34, 0.15, 3.0, 5, 2),  # 5 / 3 rounds up
        (100, 0.15, 3.0, 15, 5),
        (568, 0.15, 3.0, 85, 28),
        (1137, 0.15, 3.0, 171, 57),
        # Python's round is half to even, like the reference: 4.5 -> 4, 254.5 -> 254.
        (30, 0.15, 3.0, 4, 1),
        (509, 0.5, 3.0, 254, 85),
        (18, 0.5, 2.0, 9, 4),
        (3, 0.9, 2.0, 2, 1),  # clipped down: one token stays
    ],
)
def test_noise_span_counts(length, density, mean, num_noise, num_spans):
    assert noise_span_counts(length, density, mean) == (num_noise, num_spans)
    assert output_shapes(length, noise_density=density, mean_noise_span_length=mean) == (
        (2, length - num_noise + num_spans + 1),
        (2, num_noise + num_spans + 1),
    )


@pytest.mark.parametrize("length,num_noise,num_spans", [(20, 3, 1), (100, 15, 5), (568, 85, 28)])
def test_counts_sentinel_order_and_round_trip(length, num_noise, num_spans):
    tokens = distinct_tokens(length, 8, length)
    out = span_corruption(jax.random.key(2), tokens, vocab_size=VOCAB)
    expected_sentinels = [VOCAB - 1 - i for i in range(num_spans)]
    for row in range(8):
        inputs, targets = np.asarray(out["inputs"][row]), np.asarray(out["targets"][row])
        assert inputs[inputs >= FIRST_SENTINEL].tolist() == expected_sentinels
        assert targets[targets >= FIRST_SENTINEL].tolist() == expected_sentinels
        assert targets[0] == VOCAB - 1
        assert int(((targets < FIRST_SENTINEL) & (targets != EOS)).sum()) == num_noise

        raw, mask, spans = decode(inputs, targets)
        np.testing.assert_array_equal(raw, np.asarray(tokens[row]))
        assert all(len(span) >= 1 for span in spans)
        assert not mask[0], "the first token is noise: spans must start with non-noise"
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert int(starts.sum()) == num_spans  # no two spans touch: each is its own run
        assert int(mask.sum()) == num_noise

        # Kept input tokens plus target spans hold every raw token exactly once.
        kept = inputs[(inputs < FIRST_SENTINEL) & (inputs != EOS)].tolist()
        pieces = kept + [tok for span in spans for tok in span]
        assert sorted(pieces) == sorted(np.asarray(tokens[row]).tolist())


def test_same_key_same_output_new_step_new_mask():
    tokens = distinct_tokens(3, 8, 100)
    seed = jax.random.key(7)
    a = span_corruption(jax.random.fold_in(seed, 5), tokens, vocab_size=VOCAB)
    b = span_corruption(jax.random.fold_in(seed, 5), tokens, vocab_size=VOCAB)
    c = span_corruption(jax.random.fold_in(seed, 6), tokens, vocab_size=VOCAB)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    for row in range(8):
        assert not np.array_equal(a["inputs"][row], c["inputs"][row])


def test_inside_jit_with_traced_step_matches_outside_and_rows_differ():
    tokens = distinct_tokens(4, 8, 568)
    seed = jax.random.key(0)
    # As in the train step: the key is fold_in(seed_key, step) with a traced step.
    step_fn = jax.jit(
        lambda step, t: span_corruption(jax.random.fold_in(seed, step), t, vocab_size=VOCAB)
    )
    inside = step_fn(jnp.int32(3), tokens)
    outside = span_corruption(jax.random.fold_in(seed, 3), tokens, vocab_size=VOCAB)
    np.testing.assert_array_equal(inside["inputs"], outside["inputs"])
    np.testing.assert_array_equal(inside["targets"], outside["targets"])
    masks = [decode(inside["inputs"][r], inside["targets"][r])[1] for r in range(8)]
    assert len({m.tobytes() for m in masks}) == 8


def test_raw_uint32_key_and_outer_vmap():
    tokens = distinct_tokens(5, 8, 100).reshape(2, 4, 100)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    out = jax.vmap(lambda k, t: span_corruption(k, t, vocab_size=VOCAB))(keys, tokens)
    assert out["inputs"].shape == (2, 4, 100 - 15 + 5 + 1)
    single = span_corruption(keys[1], tokens[1], vocab_size=VOCAB)
    np.testing.assert_array_equal(out["targets"][1], single["targets"])
    np.testing.assert_array_equal(out["inputs"][1], single["inputs"])


def test_custom_eos_and_vocab():
    tokens = distinct_tokens(6, 8, 20)
    out = span_corruption(jax.random.key(0), tokens, vocab_size=32100, eos_id=0)
    assert (out["inputs"][:, -1] == 0).all() and (out["targets"][:, -1] == 0).all()
    assert (out["targets"][:, 0] == 32099).all()
    assert not (out["inputs"][:, :-1] == 0).any()


def t5_random_segmentation(rng, num_items, num_segments, rows):
    """Segment lengths [rows, num_segments] drawn as T5's ``_random_segmentation`` draws them
    (t5/data/preprocessors.py): shuffle ``num_segments - 1`` ones among ``num_items - 1``
    zeros, put a 0 in front, cumsum to segment ids, count the items of each id. NumPy only."""
    marks = np.zeros((rows, num_items - 1), np.int64)
    marks[:, : num_segments - 1] = 1
    marks = rng.permuted(marks, axis=1)
    ids = np.cumsum(np.concatenate([np.zeros((rows, 1), np.int64), marks], axis=1), axis=1)
    return np.stack([np.bincount(r, minlength=num_segments) for r in ids])


def segment_law(num_items, num_segments):
    """P(one segment has length l), l = 1..num_items - num_segments + 1, when ``num_items`` are
    cut into ``num_segments`` non-empty segments with every cut equally likely: the other
    segments hold ``num_items - l`` items in ``num_segments - 1`` parts, so
    P(l) = C(num_items - l - 1, num_segments - 2) / C(num_items - 1, num_segments - 1)."""
    ls = np.arange(1, num_items - num_segments + 2)
    p = np.array([math.comb(num_items - n - 1, num_segments - 2) for n in ls], float)
    return p / math.comb(num_items - 1, num_segments - 1)


def chi_square_p(samples, probabilities):
    """Goodness of fit of integer samples (1-based) to a law; tail bins merged to >= 20."""
    counts = np.bincount(samples, minlength=len(probabilities) + 1)[1:]
    expected = probabilities * len(samples)
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(counts, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 20:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    obs[-1], exp[-1] = obs[-1] + acc_o, exp[-1] + acc_e
    return stats.chisquare(obs, exp).pvalue


def runs(mask_row):
    """Lengths of the noise runs and of the non-noise runs of one mask, in order."""
    edges = np.flatnonzero(np.diff(mask_row.astype(np.int8))) + 1
    pieces = np.split(mask_row, edges)
    noise = [len(p) for p in pieces if p[0]]
    keep = [len(p) for p in pieces if not p[0]]
    return noise, keep


def masks_of(key, length, rows):
    """The noise masks span_corruption drew for ``rows`` copies of 2..length+1."""
    tokens = jnp.tile(jnp.arange(2, 2 + length, dtype=jnp.int32), (rows, 1))
    targets = np.asarray(span_corruption(key, tokens, vocab_size=VOCAB)["targets"])
    # Raw token t sits at position t - 2, so the targets name the noise positions directly.
    noise = (targets < FIRST_SENTINEL) & (targets != EOS)
    masks = np.zeros((rows, length + 2), bool)
    masks[np.nonzero(noise)[0], targets[noise]] = True
    return masks[:, 2:]


def test_chi_square_check_rejects_a_wrong_segmentation():
    """The check below can fail: equal-ish spans, or cuts biased to one end, are rejected."""
    law = segment_law(85, 28)
    rng = np.random.default_rng(0)
    right = t5_random_segmentation(rng, 85, 28, 2000).ravel()
    assert chi_square_p(right, law) > 1e-3
    even = np.full(28 * 2000, 3)
    even[::3] = 4
    assert chi_square_p(even, law) < 1e-12
    biased = t5_random_segmentation(rng, 85, 28, 2000)
    biased[:, 0] += biased[:, 1] - 1  # first span swallows the second but one
    biased[:, 1] = 1
    assert chi_square_p(biased.ravel(), law) < 1e-12


def test_span_lengths_follow_t5_random_segmentation_across_keys():
    """Per example, T5 cuts 85 noise tokens into 28 spans and 483 kept tokens into 28 runs,
    every cut equally likely. Over many keys and rows, the span lengths we draw follow the
    exact law of such a cut; each example's longest span and its first span's start follow a
    NumPy simulation of T5's own ``_random_segmentation``."""
    length, rows, steps = 568, 256, 8
    seed = jax.random.key(11)
    masks = np.concatenate([masks_of(jax.random.fold_in(seed, s), length, rows)
                            for s in range(steps)])
    noise, keep = zip(*(runs(m) for m in masks), strict=True)
    assert all(len(n) == 28 and len(k) == 28 for n, k in zip(noise, keep, strict=True))
    assert not masks[:, 0].any(), "the first token is never noise"
    noise, keep = np.array(noise), np.array(keep)

    # Each span's (and run's) length against the exact combinatorial law, per span index.
    for index in (0, 13, 27):
        assert chi_square_p(noise[:, index], segment_law(85, 28)) > 1e-4
        assert chi_square_p(keep[:, index], segment_law(483, 28)) > 1e-4
    assert chi_square_p(noise.ravel(), segment_law(85, 28)) > 1e-4
    assert chi_square_p(keep.ravel(), segment_law(483, 28)) > 1e-4

    # Per-example statistics against T5's segmentation simulated in NumPy.
    rng = np.random.default_rng(5)
    sim_noise = t5_random_segmentation(rng, 85, 28, 20000)
    sim_keep = t5_random_segmentation(rng, 483, 28, 20000)
    assert stats.ks_2samp(noise.max(axis=1), sim_noise.max(axis=1)).pvalue > 1e-4
    assert stats.ks_2samp(keep[:, 0], sim_keep[:, 0]).pvalue > 1e-4  # first span's start
    # The two cuts are independent: first noise span length vs the run before it.
    assert abs(np.corrcoef(noise[:, 0], keep[:, 0])[0, 1]) < 0.05
    # Examples differ: 2048 rows, 2048 distinct masks.
    assert len({m.tobytes() for m in masks}) == len(masks)
    # Noise is spread over the whole chunk, not piled at one end.
    for part in np.array_split(masks.mean(axis=0)[1:], 4):
        assert abs(part.mean() - 0.15) < 0.015


def test_bad_settings_stop_with_a_sentence():
    with pytest.raises(UserError, match="at least 2 tokens"):
        span_corruption(jax.random.key(0), jnp.ones((1, 1), jnp.int32), vocab_size=VOCAB)
    with pytest.raises(UserError, match="mean_noise_span_length"):
        noise_span_counts(100, 0.5, 0.5)
    with pytest.raises(UserError, match="noise_density"):
        span_corruption_lengths(512, 1.0, 3.0)
    with pytest.raises(UserError, match="shaped"):
        span_corruption(jax.random.key(0), jnp.ones((10,), jnp.int32), vocab_size=VOCAB)
