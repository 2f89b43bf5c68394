"""Sliding-window perplexity against brute force: a bigram table (exact per-token log-probs)
and a model whose prediction depends on the whole left context, scored token by token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.errors import UserError
from t5x_like.evaluation.perplexity import sliding_window_perplexity, sliding_windows

V = 7
RNG = np.random.default_rng(0)
BIGRAM = np.log(RNG.dirichlet(np.ones(V), size=V))  # BIGRAM[a, b] = log p(b | a)
EMBED = RNG.normal(size=(V, 5))
DECAY = 0.6


def stream_of(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, V, size=length)  # 0 stays the pad id


def bigram_score(tokens: np.ndarray, weights: np.ndarray) -> float:
    """Sum over weighted positions i >= 1 of log p(tokens[i] | tokens[i - 1])."""
    assert not weights[:, 0].any(), "a window's first token has no context to be scored with"
    ll = BIGRAM[tokens[:, :-1], tokens[:, 1:]]
    return float((ll * weights[:, 1:]).sum())


def context_logp(context: np.ndarray, token: int) -> float:
    """log p(token | context): softmax of E @ h, h = sum_j DECAY^(k-1-j) E[context_j]."""
    k = len(context)
    h = sum(DECAY ** (k - 1 - j) * EMBED[c] for j, c in enumerate(context))
    logits = EMBED @ h
    return float(logits[token] - np.log(np.exp(logits).sum()))


@jax.jit
def _context_ll(tokens, weights):
    w = tokens.shape[1]
    i, j = jnp.arange(w)[:, None], jnp.arange(w)[None, :]
    decay = jnp.where(j < i, DECAY ** (i - 1 - j), 0.0)  # position i sees j < i
    h = jnp.einsum("ij,nje->nie", decay, jnp.asarray(EMBED)[tokens])
    logp = jax.nn.log_softmax(h @ jnp.asarray(EMBED).T, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(weights > 0, picked, 0.0))


def context_score(tokens: np.ndarray, weights: np.ndarray) -> float:
    """The same model, jitted, on [N, W] windows (each position's context = its window's left)."""
    assert not weights[:, 0].any()
    return float(_context_ll(jnp.asarray(tokens), jnp.asarray(weights)))


def brute_force(stream: np.ndarray, window: int, stride: int, logp) -> tuple[float, int]:
    """Token by token: token t is scored by the first window (starts 0, S, 2S, ...) whose end
    passes it, with that window's tokens before t as context; no context, no score."""
    total, count = 0.0, 0
    for t in range(len(stream)):
        k = 0
        while min(k * stride + window, len(stream)) <= t:
            k += 1
        begin = k * stride
        if begin < t:
            total += logp(stream[begin:t], int(stream[t]))
            count += 1
    return total, count


def test_windows_of_a_small_stream():
    tokens, weights = sliding_windows(np.arange(1, 11), window=4, stride=2)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10]])
    np.testing.assert_array_equal(weights, [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    tokens, weights = sliding_windows(np.arange(1, 8), window=4, stride=3)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 4], [4, 5, 6, 7]])
    np.testing.assert_array_equal(weights, [[0, 1, 1, 1], [0, 1, 1, 1]])  # 5, 6, 7 in row 2
    tokens, weights = sliding_windows(np.arange(1, 4), window=8, stride=4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(weights, [[0, 1, 1, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("length", [1, 2, 37, 64, 100])
@pytest.mark.parametrize("window,stride", [(8, 1), (8, 3), (8, 7), (16, 5), (5, 5)])
def test_every_token_scored_once(length, window, stride):
    stream = stream_of(length, length)
    if length < 2:
        with pytest.raises(UserError, match="nothing to score"):
            sliding_windows(stream, window=window, stride=stride)
        return
    tokens, weights = sliding_windows(stream, window=window, stride=stride)
    begins = np.arange(len(tokens)) * stride
    times = np.zeros(length)
    for begin, row_tokens, row_weights in zip(begins, tokens, weights, strict=True):
        stop = min(begin + window, length)
        np.testing.assert_array_equal(row_tokens[: stop - begin], stream[begin:stop])
        times[begin:stop] += row_weights[: stop - begin]
        assert not row_weights[stop - begin :].any()
    if stride < window:
        np.testing.assert_array_equal(times, [0] + [1] * (length - 1))
    else:  # disjoint chunks: each chunk's first token is context only
        np.testing.assert_array_equal(times, np.arange(length) % window != 0)


@pytest.mark.parametrize("window,stride", [(8, 1), (8, 3), (8, 4), (16, 5), (9, 8)])
def test_bigram_perplexity_equals_exact_sum_over_the_stream(window, stride):
    # With stride < window every token after the first is scored once with its predecessor in
    # context, so the total is the stream's own bigram log-likelihood, whatever the windows.
    stream = stream_of(1, 101)
    exact = BIGRAM[stream[:-1], stream[1:]].sum()
    out = sliding_window_perplexity(stream, bigram_score, window=window, stride=stride)
    assert out["tokens"] == 100
    assert out["nll"] == pytest.approx(-exact / 100, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(-exact / 100), rel=1e-12)


@pytest.mark.parametrize("window,stride", [(8, 1), (8, 3), (8, 8), (12, 5), (6, 4)])
def test_context_model_matches_brute_force(window, stride):
    stream = stream_of(2, 53)
    total, count = brute_force(stream, window, stride, context_logp)
    for batch_size in (1, 3, 8):
        out = sliding_window_perplexity(
            stream, context_score, window=window, stride=stride, batch_size=batch_size
        )
        assert out["tokens"] == count
        assert out["nll"] == pytest.approx(-total / count, rel=1e-5)  # float32 model


@pytest.mark.parametrize("window", [4, 8, 10])
def test_stride_equal_to_window_is_naive_chunking(window):
    stream = stream_of(3, 47)
    total = count = 0
    for begin in range(0, len(stream), window):  # each chunk scored on its own
        chunk = stream[begin : begin + window]
        weights = (np.arange(len(chunk)) > 0).astype(np.float32)
        total += bigram_score(chunk[None], weights[None])
        count += len(chunk) - 1
    out = sliding_window_perplexity(stream, bigram_score, window=window, stride=window)
    assert out["tokens"] == count
    assert out["nll"] == pytest.approx(-total / count, rel=1e-12)
    # More overlap gives every chunk start its context back: a different number.
    overlapped = sliding_window_perplexity(stream, bigram_score, window=window, stride=2)
    assert overlapped["tokens"] == len(stream) - 1 and overlapped["nll"] != out["nll"]


def test_bad_arguments():
    stream = stream_of(4, 20)
    with pytest.raises(UserError, match="stride"):
        sliding_windows(stream, window=4, stride=5)
    with pytest.raises(UserError, match="stride"):
        sliding_windows(stream, window=4, stride=0)
    with pytest.raises(UserError, match="window"):
        sliding_windows(stream, window=1, stride=1)
    with pytest.raises(UserError, match="1-D"):
        sliding_windows(stream.reshape(4, 5), window=4, stride=2)
    with pytest.raises(UserError, match="batch_size"):
        sliding_window_perplexity(stream, bigram_score, window=4, stride=2, batch_size=0)
