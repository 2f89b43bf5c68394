"""XLNet's permutation language modelling objective, in pure jnp with static shapes.

Per sequence: choose the targets (about 1/K of the ordinary tokens, a fixed budget of P rows),
sample a factorisation order with the targets last, and build from it the attention pattern
(``perm_mask``), the one-hot ``target_mapping`` [P, L] and the target ids and weights.

The mask is the reference code's rule (zihangdai/xlnet, ``data_utils.py``, ``_local_perm``;
Yang et al., 2019, §2.3 and Appendix A.2): ``rank[j]`` is j's place in the order
for targets and special tokens and -1 for ordinary context tokens; ``self_rank[i] = rank[i]``
for targets, ``rank[i] + 1`` otherwise; ``perm_mask[i, j] = 1`` (i cannot see j) iff
``self_rank[i] <= rank[j]`` and j is a target or special token. So context tokens are seen by
everyone and see no target, a target sees the targets before it, and a target's row hides its
own token (the query stream predicts it); ``stream_masks`` turns this into the two streams'
masks (the content stream may always see itself, the query stream never).

Two ways to choose targets: the paper's (the last P tokens of a uniformly random order, i.e. a
uniform random subset) and, with ``span=True``, the reference code's n-gram spans (lengths 1..5
with p(n) proportional to 1/n, each with n * K context tokens around it, topped up with single
random tokens to the budget), whose tokens are then permuted to the end of the order. Unlike
the reference, spans are not aligned to whole words (no word-piece information on device).

Rows with padding or special tokens keep the same shapes: a row with n ordinary tokens predicts
``min(P, ceil(n * P / L))`` of them (P on a full row, ~1/K of a short one); unused target rows
are zero with weight 0, as in the reference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from t5x_like.errors import UserError


def num_predictions(length: int, k: float = 6.0) -> int:
    """P = round(L / K) targets per sequence: 85 of 512 with K = 6, as the reference uses."""
    if k < 1:
        raise UserError(f"the permutation objective's K must be at least 1 (K = 6 predicts about "
                        f"1/6 of the tokens), got {k}.")
    return max(1, round(length / k))


def stream_masks(
    perm_mask: jax.Array, attention_mask: jax.Array | None = None, mem_length: int = 0
) -> tuple[jax.Array, jax.Array]:
    """(content, query) attention masks [B, L, mem_length + L], True = may attend.

    ``perm_mask`` [B, L, L] is non-zero where i cannot see j; ``attention_mask`` [B, L] is 0 on
    padding keys. Memory slots (the previous segment) are visible to every position. The content
    stream h_i may always see its own token; the query stream g_i never does, whatever
    ``perm_mask`` says on its diagonal (transformers relies on the mask having it set).
    """
    allowed = ~(perm_mask > 0)
    if attention_mask is not None:
        allowed = allowed & (attention_mask > 0)[:, None, :]
    eye = jnp.eye(perm_mask.shape[-1], dtype=bool)
    content, query = allowed | eye, allowed & ~eye
    if mem_length:
        memory = jnp.ones((*perm_mask.shape[:2], mem_length), bool)
        content = jnp.concatenate([memory, content], axis=-1)
        query = jnp.concatenate([memory, query], axis=-1)
    return content, query


def _take_random(key: jax.Array, candidates: jax.Array, n: jax.Array) -> jax.Array:
    """A uniformly random subset of ``n`` of the ``candidates`` (all of them if fewer)."""
    scores = jnp.where(candidates, jax.random.uniform(key, candidates.shape), 2.0)
    place = jnp.zeros(candidates.shape, jnp.int32).at[jnp.argsort(scores)].set(
        jnp.arange(candidates.shape[0], dtype=jnp.int32))
    return candidates & (place < n)


def sample_spans(
    key: jax.Array, eligible: jax.Array, budget: jax.Array, *, k: float = 6.0, max_span: int = 5
) -> jax.Array:
    """The reference's n-gram spans over one row: a bool mask of at most ``budget`` tokens.

    Walking left to right from ``cur = 0``: draw n in 1..max_span with p(n) ~ 1/n (cut to the
    budget left), a context of ``floor(n * K)`` tokens split at random into left and right
    parts; the span is ``[cur + left, cur + left + n)``, then ``cur`` moves past the right part.
    It stops at the budget or at the first span that would reach the end of the row (the
    reference's ``end >= seg_len``). Only ``eligible`` tokens count toward the budget. Spans
    never touch: the right context is at least one token.
    """
    length = eligible.shape[0]
    ngrams = jnp.arange(1, max_span + 1)
    logits = -jnp.log(ngrams.astype(jnp.float32))
    positions = jnp.arange(length)
    # Each drawn span moves ``cur`` by at least 1 + floor(K), and each adds a token or ends.
    steps = min(length, length // (1 + math.floor(k)) + 2)

    def step(carry, key):
        cur, count, done, mask = carry
        k_n, k_left = jax.random.split(key)
        n = jnp.minimum(ngrams[jax.random.categorical(k_n, logits)], budget - count)
        context = jnp.floor(n * k).astype(jnp.int32)
        left = jax.random.randint(k_left, (), 0, jnp.maximum(context, 1))
        begin = cur + left
        end = begin + n
        done = done | (count >= budget) | (end >= length)
        span = ~done & (positions >= begin) & (positions < end) & eligible
        cur = jnp.where(done, cur, end + context - left)
        return (cur, count + jnp.sum(span), done, mask | span), None

    init = (jnp.int32(0), jnp.int32(0), jnp.bool_(False), jnp.zeros((length,), bool))
    (_, _, _, mask), _ = lax.scan(step, init, jax.random.split(key, steps))
    return mask


def _row(
    key: jax.Array,
    tokens: jax.Array,
    *,
    num_predict: int,
    k: float,
    special_ids: tuple[int, ...],
    pad_id: int | None,
    span: bool,
    max_span: int,
) -> dict[str, jax.Array]:
    length = tokens.shape[0]
    special = jnp.isin(tokens, jnp.asarray(special_ids, tokens.dtype)) if special_ids else (
        jnp.zeros((length,), bool))
    padding = tokens == pad_id if pad_id is not None else jnp.zeros((length,), bool)
    special = special & ~padding
    eligible = ~special & ~padding
    n_eligible = jnp.sum(eligible)
    count = jnp.minimum(num_predict, (n_eligible * num_predict + length - 1) // length)

    k_pick, k_fill, k_order = jax.random.split(key, 3)
    if span:
        spans = sample_spans(k_pick, eligible, count, k=k, max_span=max_span)
        target = spans | _take_random(k_fill, eligible & ~spans, count - jnp.sum(spans))
    else:
        target = _take_random(k_pick, eligible, count)

    # The factorisation order: non-targets first, then the targets, each part in random order.
    order_key = jax.random.uniform(k_order, (length,)) + target.astype(jnp.float32) * 2.0
    rank = jnp.zeros((length,), jnp.int32).at[jnp.argsort(order_key)].set(
        jnp.arange(length, dtype=jnp.int32))

    in_order = target | special  # the rest is context: rank -1, before everything
    rank_eff = jnp.where(in_order, rank, -1)
    self_rank = jnp.where(target, rank_eff, rank_eff + 1)
    perm_mask = (self_rank[:, None] <= rank_eff[None, :]) & in_order[None, :]

    # Target rows in position order, as the reference's boolean_mask gives them.
    dest = jnp.where(target, jnp.cumsum(target) - 1, num_predict)
    positions = jnp.arange(length)
    target_mapping = jnp.zeros((num_predict, length), jnp.float32).at[dest, positions].set(
        1.0, mode="drop")
    targets = jnp.zeros((num_predict,), jnp.int32).at[dest].set(tokens, mode="drop")
    weights = jnp.zeros((num_predict,), jnp.float32).at[dest].set(1.0, mode="drop")
    return {"perm_mask": perm_mask, "target_mapping": target_mapping, "targets": targets,
            "target_weights": weights, "is_target": target, "rank": rank}


@functools.partial(jax.jit, static_argnames=("num_predict", "k", "special_ids", "pad_id", "span",
                                             "max_span"))
def _batch(key: jax.Array, tokens: jax.Array, **kwargs) -> dict[str, jax.Array]:
    """One key per row, the row function vmapped (jitted for eager calls; inlined in a step)."""
    keys = jax.random.split(key, tokens.shape[0])
    return jax.vmap(functools.partial(_row, **kwargs))(keys, tokens)


def permutation_lm(
    key: jax.Array,
    tokens: jax.Array,
    *,
    num_predict: int | None = None,
    k: float = 6.0,
    special_ids: Sequence[int] = (),
    pad_id: int | None = 0,
    span: bool = False,
    max_span: int = 5,
) -> dict[str, jax.Array]:
    """XLNet's permutation LM features for ``tokens`` [B, L], a fresh order per row.

    ``key`` covers the batch (``fold_in(seed_key, step)`` in training) and is split per row.
    ``num_predict`` = P target rows (default ``round(L / K)``); ``special_ids`` (e.g. SEP, CLS)
    are never targets and take part in the order as in the reference; ``pad_id`` tokens are
    neither (their keys are hidden by the model's attention mask). ``span=True`` picks the
    reference's n-gram spans of 1..``max_span`` tokens instead of single tokens.

    Returns ``perm_mask`` [B, L, L] bool (True: i cannot see j), ``target_mapping`` [B, P, L]
    float32 one-hot, ``targets`` [B, P] int32 (the token itself), ``target_weights`` [B, P]
    float32, ``is_target`` [B, L] bool, and ``rank`` [B, L] int32: each position's place in the
    sampled factorisation order (targets last).
    """
    if tokens.ndim != 2:
        raise UserError(f"permutation_lm takes tokens shaped [batch, length], got {tokens.shape}.")
    length = tokens.shape[1]
    p = num_predictions(length, k) if num_predict is None else num_predict
    if not 1 <= p <= length:
        raise UserError(f"num_predict={p} must lie between 1 and the sequence length {length}.")
    if max_span < 1:
        raise UserError(f"max_span must be at least 1, got {max_span}.")
    num_predictions(length, k)  # validates K
    return _batch(key, tokens.astype(jnp.int32), num_predict=p, k=float(k),
                  special_ids=tuple(int(i) for i in special_ids), pad_id=pad_id, span=span,
                  max_span=max_span)
