"""Sliding-window perplexity of a token stream, for any model that scores fixed windows.

Hugging Face's "perplexity of fixed-length models" recipe: windows of ``window`` tokens start
every ``stride`` tokens (0, S, 2S, ... until one reaches the end of the stream); each scores
only the tokens no earlier window has scored, so every token is scored exactly once, with the
rest of its window to the left as context (at least ``window - stride`` tokens, once the
stream is long enough). A window's first token has no context in it and is never scored, so
the stream's first token is not either; with ``stride == window`` the windows are disjoint
chunks and no chunk's first token is scored: the naive chunked number.

The model is a function ``score(tokens [N, W], weights [N, W]) -> summed log-likelihood``,
where ``weights[n, i] = 1`` asks for ``log p(tokens[n, i] | tokens[n, :i])``. Windows are
built with numpy, padded with ``pad_id`` (weight 0) to the fixed shape, and handed over in
batches of a fixed number of rows (the last batch padded with all-zero-weight rows), so a
jitted ``score`` compiles once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from t5x_like.errors import UserError


def sliding_windows(
    stream: np.ndarray, *, window: int, stride: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, weights)``, int32 / float32 [num_windows, window]: the windows and which of
    their tokens to score."""
    stream = np.asarray(stream)
    if stream.ndim != 1:
        raise UserError(f"perplexity takes one token stream (1-D), got shape {stream.shape}.")
    if window < 2:
        raise UserError(f"the perplexity window must hold at least 2 tokens, got {window}.")
    if not 1 <= stride <= window:
        raise UserError(f"the perplexity stride must lie in [1, window={window}], got {stride}.")
    total = stream.shape[0]
    if total < 2:
        raise UserError(f"a stream of {total} token(s) leaves nothing to score.")
    # Windows start at 0, S, 2S, ... up to the first that reaches the end of the stream.
    num = 1 + -(-max(total - window, 0) // stride)
    begins = np.arange(num) * stride
    ends = np.minimum(begins + window, total)
    first = np.maximum(np.concatenate([[0], ends[:-1]]), begins + 1)  # first token to score
    index = begins[:, None] + np.arange(window)[None, :]
    inside = index < ends[:, None]
    tokens = np.where(inside, stream[np.minimum(index, max(total - 1, 0))], pad_id)
    weights = inside & (index >= first[:, None])
    return tokens.astype(np.int32), weights.astype(np.float32)


def sliding_window_perplexity(
    stream: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
    *,
    window: int,
    stride: int,
    batch_size: int = 8,
    pad_id: int = 0,
) -> dict[str, float]:
    """``{"perplexity", "nll", "tokens"}``: exp of the mean negative log-likelihood per scored
    token, that mean, and how many tokens were scored (``len(stream) - 1`` when
    ``stride < window``)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}.")
    tokens, weights = sliding_windows(stream, window=window, stride=stride, pad_id=pad_id)
    count = float(weights.sum())
    rows = -(-tokens.shape[0] // batch_size) * batch_size
    tokens = np.pad(tokens, ((0, rows - tokens.shape[0]), (0, 0)), constant_values=pad_id)
    weights = np.pad(weights, ((0, rows - weights.shape[0]), (0, 0)))
    log_likelihood = 0.0
    for i in range(0, rows, batch_size):
        log_likelihood += float(score(tokens[i : i + batch_size], weights[i : i + batch_size]))
    nll = -log_likelihood / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": int(count)}
