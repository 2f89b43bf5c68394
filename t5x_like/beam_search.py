"""Beam search over a ``stepper.Stepper``, step for step as transformers' ``generate``.

Per input row, ``K = beam_size`` running beams and up to K finished hypotheses are kept
apart. Each step scores every (beam, token) continuation by its summed log-probability and
takes the best 2K (so K survive even if K of them end in EOS). Of these, the ones among the
top K that end in EOS or reach ``max_length`` become finished hypotheses, scored
``sum log p / length ** alpha`` (length = generated tokens, EOS included) and merged with the
previous K best finished ones; the best K that did not end continue, and the KV cache rows
follow their parent beams (a gather on the row axis of each cache entry). A row stops taking
new hypotheses once no running beam can beat its worst finished one (``early_stopping``, see
``stepper.Options``); the loop ends when every row has stopped or reached ``max_length``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.stepper import Options, Stepper

NEG = -1.0e9  # transformers' "impossible" score; added, not assigned, as it does


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, M, ...] -> [B, J, ...] along axis 1 with index [B, J]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(s: Stepper, options: Options, *, batch_size: int, max_length: int,
                eos_id: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """The best ``num_return_sequences`` hypotheses per input: tokens [B, R, max_length]
    (``pad_id`` after EOS) and their length-penalised scores [B, R], best first.

    ``s`` has ``batch_size * beam_size`` rows (each input repeated ``beam_size`` times).
    """
    k, b = options.beam_size, batch_size
    top_mask = jnp.arange(2 * k) < k  # only the top K candidates may finish
    # length ** alpha for lengths 1..max_length, rounded once from float64 as Python does
    penalty = jnp.asarray(np.arange(1, max_length + 1, dtype=np.float64) ** options.alpha,
                          jnp.float32)
    never = options.early_stopping == "never" and options.alpha > 0
    stop_when_full = options.early_stopping is True

    def reorder(cache: dict, rows: jax.Array) -> dict:
        return {name: jnp.take(value, rows, axis=s.reorder_axes[name])
                if name in s.reorder_axes else value for name, value in cache.items()}

    def body(carry):
        (i, _, cache, previous, run_seqs, run_scores, fin_seqs, fin_scores, finished,
         open_rows) = carry
        logits, cache = s.step(previous, cache, s.first_position + i)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        totals = (log_probs.reshape(b, k, vocab) + run_scores[..., None]).reshape(b, k * vocab)
        cand_scores, flat = jax.lax.top_k(totals, 2 * k)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_seqs = _gather(run_seqs, parent).at[:, :, i].set(token)
        ended = (token == eos_id) | (i + 1 >= max_length)

        # Running beams for the next step: the best K candidates that did not end.
        live = cand_scores + ended * NEG
        keep = jax.lax.top_k(live, k)[1]
        run_seqs, run_scores = _gather(cand_seqs, keep), _gather(live, keep)
        parent = _gather(parent, keep)

        # Finished hypotheses: merge the ones that just ended with the K best so far.
        scored = cand_scores / penalty[i]
        if stop_when_full:
            scored = scored + jnp.all(finished, axis=1, keepdims=True) * NEG
        just = ended & top_mask[None]
        scored = scored + (~open_rows)[:, None] * NEG + (~just) * NEG
        best = jax.lax.top_k(jnp.concatenate([fin_scores, scored], axis=1), k)[1]
        fin_seqs = _gather(jnp.concatenate([fin_seqs, cand_seqs], axis=1), best)
        fin_scores = _gather(jnp.concatenate([fin_scores, scored], axis=1), best)
        finished = _gather(jnp.concatenate([finished, just], axis=1), best)

        cache = reorder(cache, (jnp.arange(b)[:, None] * k + parent).reshape(-1))
        previous = run_seqs[:, :, i].reshape(-1)
        i = i + 1
        # Can a running beam still beat the worst finished one? (transformers' heuristic)
        best_possible = run_scores[:, 0] / penalty[max_length - 1 if never else i - 1]
        worst = jnp.where(finished, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
        open_rows = open_rows & jnp.any(best_possible[:, None] > worst, axis=1)
        go = jnp.any(open_rows) & ~jnp.all(ended)
        if stop_when_full:
            go = go & ~jnp.all(finished)
        return (i, go, cache, previous, run_seqs, run_scores, fin_seqs, fin_scores, finished,
                open_rows)

    seqs = jnp.full((b, k, max_length), pad_id, jnp.int32)
    init = (
        jnp.zeros((), jnp.int32),
        jnp.ones((), bool),
        s.cache,
        s.first_tokens.astype(jnp.int32),
        seqs,
        jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),  # identical beams: expand one
        seqs,
        jnp.full((b, k), NEG, jnp.float32),
        jnp.zeros((b, k), bool),
        jnp.ones((b,), bool),
    )
    out = jax.lax.while_loop(lambda c: c[1] & (c[0] < max_length), body, init)
    r = options.num_return_sequences
    return out[6][:, :r], out[7][:, :r]
