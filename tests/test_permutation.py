"""XLNet's permutation objective: mask properties over many random orders (vmapped), the
XLNet reference code's rank rule (zihangdai/xlnet ``data_utils._local_perm``) written out
independently, target layout, keys, statistics, spans."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.errors import UserError
from t5x_like.objectives import num_predictions, permutation_lm, sample_spans, stream_masks

SEP, CLS, PAD = 4, 3, 0
LENGTH, P = 24, 4


def _tokens(n: int = 600, seed: int = 0) -> np.ndarray:
    """Rows of ordinary ids; in some rows a SEP and a CLS, in a third of them end padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, 60, (n, LENGTH))
    for row in range(n):
        if row % 2:
            tokens[row, rng.choice(LENGTH, 2, replace=False)] = (SEP, CLS)
        if row % 3 == 0:
            tokens[row, rng.integers(3, LENGTH):] = PAD
    return tokens


def _reference_perm_mask(rank, target, special):
    """XLNet's ``_local_perm``, literally: rank = place in the order for targets and special tokens,
    -1 otherwise; self_rank = rank for targets, rank + 1 otherwise; i cannot see j iff
    self_rank[i] <= rank[j] and j is a target or special token."""
    in_order = target | special
    r = np.where(in_order, rank, -1)
    self_r = np.where(target, r, r + 1)
    return (self_r[:, :, None] <= r[:, None, :]) & in_order[:, None, :]


@functools.cache
def _features(span: bool):
    tokens = _tokens()
    out = permutation_lm(jax.random.key(7), jnp.asarray(tokens), num_predict=P,
                         special_ids=(SEP, CLS), pad_id=PAD, span=span)
    return tokens, {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("span", [False, True])
def test_masks_follow_the_rank_rule_and_its_properties(span):
    tokens, f = _features(span)
    n, length = tokens.shape
    special, padding = np.isin(tokens, (SEP, CLS)), tokens == PAD
    context = ~special & ~padding & ~f["is_target"]
    target, rank = f["is_target"], f["rank"]
    assert f["perm_mask"].shape == (n, length, length) and f["target_mapping"].shape == (n, P,
                                                                                         length)
    np.testing.assert_array_equal(np.sort(rank, axis=1), np.tile(np.arange(length), (n, 1)))
    np.testing.assert_array_equal(f["perm_mask"], _reference_perm_mask(rank, target, special))

    content, query = (np.asarray(m) for m in stream_masks(
        jnp.asarray(f["perm_mask"]), jnp.asarray(~padding)))
    eye = np.eye(length, dtype=bool)
    assert not query[:, eye].any()  # the query stream never sees its own token
    assert content[:, eye].all()  # the content stream always may
    assert f["perm_mask"][target[:, :, None] & eye].all()  # targets' own rows hide them

    # No position sees a target later in the order (the query stream not even its own).
    later = rank[:, None, :] > rank[:, :, None]  # [b, i, j]: j after i
    assert not content[target[:, None, :] & later].any()
    assert not query[target[:, None, :] & (later | eye)].any()
    # ... but a target sees the targets before it: nothing more is hidden than the rule says.
    earlier_target = target[:, :, None] & target[:, None, :] & ~later & ~eye
    assert earlier_target.any() and content[earlier_target].all() and query[earlier_target].all()
    # Context tokens are visible to all (the query stream: to all but themselves) ...
    assert content[np.broadcast_to(context[:, None, :], content.shape)].all()
    assert query[context[:, None, :] & ~eye].all()
    # ... and see no target and no special token.
    assert not content[context[:, :, None] & (target | special)[:, None, :]].any()
    # Padding keys are hidden from everyone else.
    assert not content[padding[:, None, :] & ~eye].any()


@pytest.mark.parametrize("span", [False, True])
def test_targets_are_the_last_ordinary_tokens_of_the_order(span):
    tokens, f = _features(span)
    special, padding = np.isin(tokens, (SEP, CLS)), tokens == PAD
    target, rank = f["is_target"], f["rank"]
    assert not (target & (special | padding)).any()
    n_ordinary = np.sum(~special & ~padding, axis=1)
    count = np.minimum(P, -(-n_ordinary * P // LENGTH))  # ceil: P on a full row, ~P/L else
    np.testing.assert_array_equal(target.sum(1), count)
    assert (count == P).mean() > 0.6 and (count < P).any()
    first_target = np.where(target, rank, LENGTH).min(1)
    last_other = np.where(target, -1, rank).max(1)
    assert (last_other < first_target).all()  # targets come last in the order
    full = count == P
    np.testing.assert_array_equal(np.sort(np.where(target, rank, -1), 1)[full][:, -P:],
                                  np.tile(np.arange(LENGTH - P, LENGTH), (full.sum(), 1)))

    # target_mapping: one row per target, in position order, then zero rows of weight 0.
    tm, rows = f["target_mapping"], np.arange(P)[None, :] < count[:, None]
    np.testing.assert_array_equal(tm.sum(2), rows.astype(np.float32))
    np.testing.assert_array_equal(tm.sum(1), target.astype(np.float32))
    positions = np.argmax(tm, axis=2)
    assert (np.diff(positions, axis=1)[rows[:, 1:]] > 0).all()
    np.testing.assert_array_equal(
        f["targets"], np.where(rows, np.take_along_axis(tokens, positions, 1), 0))
    np.testing.assert_array_equal(f["target_weights"], rows.astype(np.float32))


def test_same_key_same_masks_other_key_different_and_jit_equals_eager():
    tokens = jnp.asarray(_tokens(64, seed=1))
    run = functools.partial(permutation_lm, tokens=tokens, num_predict=P, special_ids=(SEP, CLS))
    a, b = run(jax.random.key(3)), run(jax.random.key(3))
    other = run(jax.random.key(4))
    jitted = jax.jit(lambda key: run(key))(jax.random.key(3))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], jitted[name])
    assert np.mean(np.any(a["perm_mask"] != other["perm_mask"], axis=(1, 2))) > 0.9
    assert np.mean(np.any(a["is_target"] != other["is_target"], axis=1)) > 0.9


def test_targets_and_their_order_are_uniform():
    """4000 full rows, P = 4 of L = 24: each position is a target with probability 1/6
    (expected 666.7, sd 23.6), and the leftmost target is first in the order with
    probability 1/4 (expected 1000, sd 27.4); bounds at 5 sd."""
    n = 4000
    tokens = np.random.default_rng(2).integers(6, 60, (n, LENGTH))
    f = permutation_lm(jax.random.key(11), jnp.asarray(tokens), num_predict=P)
    per_position = np.asarray(f["is_target"]).sum(0)
    assert np.abs(per_position - n * P / LENGTH).max() < 5 * np.sqrt(n * P / LENGTH * (5 / 6))
    rank, target = np.asarray(f["rank"]), np.asarray(f["is_target"])
    leftmost = np.argmax(target, axis=1)
    first = np.argmin(np.where(target, rank, LENGTH), axis=1)
    assert abs(np.sum(leftmost == first) - n / P) < 5 * np.sqrt(n * 0.25 * 0.75)


def test_spans_follow_the_reference_sampler():
    """sample_spans on 300 rows of 512 with no binding budget: span lengths have p(n) ~ 1/n on
    1..5, spans never touch and never reach the last token, and they cover ~1/(1 + K) of the
    row (each span of n tokens comes with 6n context tokens)."""
    n_rows, length = 300, 512
    keys = jax.random.split(jax.random.key(5), n_rows)
    masks = np.asarray(jax.vmap(lambda k: sample_spans(k, jnp.ones(length, bool), length))(keys))
    assert not masks[:, -1].any()
    runs = []
    for row in masks:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        runs.extend(edges[1::2] - edges[::2])
    runs = np.asarray(runs)
    assert runs.max() <= 5
    expected = (1 / np.arange(1, 6)) / np.sum(1 / np.arange(1, 6))
    observed = np.bincount(runs, minlength=6)[1:] / len(runs)
    # ~33 spans per row (each advances 7n tokens, E[n] = 2.19), ~10k in all: sd of each share
    # <= 0.005; the draw cut by the row's end (one per row of 33, not recorded) tilts the
    # shares by < 0.005, so 0.02 is ~3 sd plus that bias.
    assert len(runs) > 9000
    np.testing.assert_allclose(observed, expected, atol=0.02)
    assert abs(masks.mean() - 1 / 7) < 0.005  # sd of the mean ~0.0017, end effect ~-0.0005


def test_span_mode_predicts_whole_spans_within_the_budget():
    """With span=True the targets come in runs (a target's right neighbour is a target far
    more often than the (P-1)/(L-1) of single-token targets) and a full row has exactly P."""
    tokens = jnp.asarray(np.random.default_rng(3).integers(6, 60, (200, 512)))
    adjacency = {}
    for span in (False, True):
        f = permutation_lm(jax.random.key(2), tokens, span=span)
        target = np.asarray(f["is_target"])
        np.testing.assert_array_equal(target.sum(1), 85)
        adjacency[span] = np.sum(target[:, 1:] & target[:, :-1]) / np.sum(target[:, :-1])
    assert adjacency[False] == pytest.approx(84 / 511, abs=0.01)
    assert adjacency[True] > 0.4


def test_counts_and_errors():
    assert num_predictions(512) == 85  # the reference's 85 of 512 with K = 6
    assert num_predictions(128, 6) == 21
    with pytest.raises(UserError, match="batch, length"):
        permutation_lm(jax.random.key(0), jnp.ones((8,), jnp.int32))
    with pytest.raises(UserError, match="num_predict"):
        permutation_lm(jax.random.key(0), jnp.ones((2, 8), jnp.int32), num_predict=9)
    with pytest.raises(UserError, match="K"):
        permutation_lm(jax.random.key(0), jnp.ones((2, 8), jnp.int32), k=0.5)
