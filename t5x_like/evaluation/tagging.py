"""Span-level precision, recall and F1 of a token-classification checkpoint (NER), by seqeval.

Per example the head's argmax tag at every labelled position (each word's first piece: the
task's ``token_labels`` >= 0) and the gold tag there are read as one sequence of tag names
(``finetune.label_names``, IOB/IOB2 as the task spells them) and handed to ``seqeval``'s
``precision_score`` / ``recall_score`` / ``f1_score`` (micro-averaged over entity spans, in
its default conlleval-compatible mode: a span counts only with the exact boundaries and type).
Words cut off by ``data.inputs_length`` are scored on neither side, so the numbers are over the
words that fit. Padding rows (``valid`` 0) are skipped.
"""

from __future__ import annotations

import jax
import numpy as np

from t5x_like.distributed import host_array
from t5x_like.errors import UserError
from t5x_like.evaluation.loop import device_batches


def tag_sequences(predicted: np.ndarray, labels: np.ndarray, valid: np.ndarray,
                  names: tuple[str, ...]) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag-name sequences of the valid rows, at positions with labels >= 0."""
    gold, guess = [], []
    for row in np.flatnonzero(valid > 0):
        keep = labels[row] >= 0
        gold.append([names[i] for i in labels[row][keep]])
        guess.append([names[i] for i in predicted[row][keep]])
    return gold, guess


def span_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """seqeval's span-level micro precision / recall / F1 (``span_precision``, ...)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    kw = {"zero_division": 0}
    return {"span_precision": float(precision_score(gold, predicted, **kw)),
            "span_recall": float(recall_score(gold, predicted, **kw)),
            "span_f1": float(f1_score(gold, predicted, **kw))}


def evaluate_spans(exp, params: dict, *, num_batches: int = 0) -> dict[str, float]:
    """``span_scores`` of the checkpoint over the first ``num_batches`` evaluation batches
    (0 = the whole split), with ``span_examples`` and ``span_words`` counted."""
    names = tuple(exp.config.finetune.label_names)
    predict = jax.jit(lambda p, b: exp.family.predict_batch(p, b))
    gold, guess = [], []
    for i, batch in enumerate(device_batches(exp, split=exp.config.data.eval_split,
                                             repeat=False, shuffle=False)):
        if num_batches and i >= num_batches:
            break
        if "segment_ids" in batch:
            raise UserError("span F1 reads one example per row: evaluate with data.pack=False")
        predicted = host_array(predict(params, batch))
        g, p = tag_sequences(predicted, host_array(batch["token_labels"]),
                             host_array(batch["valid"]), names)
        gold += g
        guess += p
    if not gold:
        raise UserError(f"split {exp.config.data.eval_split!r} of {exp.config.data.task!r} "
                        "gave no example to score")
    return {**span_scores(gold, guess), "span_examples": len(gold),
            "span_words": sum(map(len, gold))}
