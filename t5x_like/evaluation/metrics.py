"""Evaluation metrics: GLUE/SuperGLUE, SQuAD, ROUGE, BLEU, perplexity, ranking, rank classification.

Task metrics follow seqio's contract ``fn(targets, predictions) -> {name: value}`` on
postprocessed values (class ids, floats, strings), and report percentages as the T5 paper's
tables do (accuracy 91.3, not 0.913); BLEU is sacrebleu's 0-100 score. Ranking metrics are
fractions in [0, 1] and perplexity is a plain ratio, as their literature writes them.

Classification metrics are written out in numpy from their definitions (the tests hold them
against sklearn and scipy); an invalid prediction (-1: the model wrote no label word) is a
class of its own, so it is always wrong. ROUGE comes from ``rouge-score`` (Google's
reimplementation of the Perl script) and BLEU from ``sacrebleu``, the maintained references.
BERTScore lives in ``bertscore.py``.
"""

from __future__ import annotations

import collections
import math
import random
import re
import string
from collections.abc import Callable, Collection, Hashable, Sequence

import numpy as np

from t5x_like.errors import UserError

# --------------------------------------------------------------------------- classification


def _arrays(targets, predictions) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(targets), np.asarray(predictions)
    if t.shape != p.shape or t.ndim != 1:
        raise UserError(f"metrics need one prediction per target, got {t.shape} targets and "
                        f"{p.shape} predictions")
    if t.size == 0:
        raise UserError("metrics need at least one example")
    return t, p


def accuracy(targets, predictions) -> dict[str, float]:
    """Percentage of exact matches."""
    t, p = _arrays(targets, predictions)
    return {"accuracy": 100.0 * float(np.mean(t == p))}


def _f1(tp: float, fp: float, fn: float) -> float:
    """F1 from counts; 0 when there is nothing to score (sklearn's zero_division=0)."""
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def f1_binary(targets, predictions) -> dict[str, float]:
    """F1 of class 1 (MRPC "equivalent", QQP "duplicate", MultiRC "True"); a prediction that is
    neither 0 nor 1 counts as wrong (a miss if the target is 1, a false alarm if it is 0)."""
    t, p = _arrays(targets, predictions)
    tp = np.sum((t == 1) & (p == 1))
    fp = np.sum((t != 1) & (p != t))  # a 0 called 1, or called invalid
    fn = np.sum((t == 1) & (p != 1))
    return {"f1": 100.0 * _f1(tp, fp, fn)}


def macro_f1(num_classes: int) -> Callable:
    """Unweighted mean of per-class F1 over classes 0..num_classes-1 (CommitmentBank)."""

    def mean_class_f1(targets, predictions) -> dict[str, float]:
        t, p = _arrays(targets, predictions)
        scores = [_f1(np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)),
                      np.sum((t == c) & (p != c))) for c in range(num_classes)]
        return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}

    return mean_class_f1


def matthews_corrcoef(targets, predictions) -> dict[str, float]:
    """Matthews correlation (CoLA), the multi-class form (Gorodkin's R_K) over every label
    seen, so an invalid prediction is a class of its own; 0 when it is undefined."""
    t, p = _arrays(targets, predictions)
    labels = {v: i for i, v in enumerate(np.unique(np.concatenate([t, p])))}
    confusion = np.zeros((len(labels), len(labels)))
    np.add.at(confusion, ([labels[v] for v in t], [labels[v] for v in p]), 1)
    true_counts, pred_counts = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), np.trace(confusion)
    denominator = math.sqrt((n * n - pred_counts @ pred_counts)
                            * (n * n - true_counts @ true_counts))
    value = (correct * n - true_counts @ pred_counts) / denominator if denominator else 0.0
    return {"matthews_corrcoef": 100.0 * float(value)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; nan when either side is constant (undefined, as scipy and T5 report it)."""
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator else math.nan


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(values))
    return (sums / np.bincount(inverse, minlength=len(values)))[inverse]


def pearson_corrcoef(targets, predictions) -> dict[str, float]:
    """Pearson correlation (STS-B); nan for constant predictions, as in T5."""
    t, p = _arrays(targets, predictions)
    return {"pearson_corrcoef": 100.0 * _pearson(t.astype(float), p.astype(float))}


def spearman_corrcoef(targets, predictions) -> dict[str, float]:
    """Spearman rank correlation (STS-B): Pearson of the tie-averaged ranks (nan when
    constant)."""
    t, p = _arrays(targets, predictions)
    return {"spearman_corrcoef": 100.0 * _pearson(_average_ranks(t.astype(float)),
                                                  _average_ranks(p.astype(float)))}


# --------------------------------------------------------------------------- SQuAD, ReCoRD, MultiRC


def normalize_squad(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, drop punctuation, drop the articles
    a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(target: str, prediction: str) -> float:
    """Token-overlap F1 of two normalised answers (bag of words, counts clipped)."""
    t, p = normalize_squad(target).split(), normalize_squad(prediction).split()
    common = sum((collections.Counter(t) & collections.Counter(p)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and F1, each the best over a question's gold answers, in percent."""
    if len(targets) != len(predictions) or not targets:
        raise UserError(f"SQuAD needs one prediction per question, got {len(targets)} answer "
                        f"lists and {len(predictions)} predictions")
    em = [max(normalize_squad(a) == normalize_squad(p) for a in answers)
          for answers, p in zip(targets, predictions, strict=True)]
    f1 = [max(squad_f1(a, p) for a in answers)
          for answers, p in zip(targets, predictions, strict=True)]
    return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def normalize_trivia_qa(text: str) -> str:
    """TriviaQA's official normalisation: lower case, punctuation (and ‘’´`_) to spaces, drop
    the articles, collapse whitespace."""
    drop = set(string.punctuation + "‘’´`_")
    text = "".join(" " if ch in drop else ch for ch in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def trivia_qa(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """TriviaQA exact match and F1 (best over the gold answers), after TriviaQA's
    normalisation, in percent."""
    if len(targets) != len(predictions) or not targets:
        raise UserError(f"TriviaQA needs one prediction per question, got {len(targets)} "
                        f"answer lists and {len(predictions)} predictions")

    def f1(a: str, b: str) -> float:
        t, p = a.split(), b.split()
        common = sum((collections.Counter(t) & collections.Counter(p)).values())
        return 2 * common / (len(t) + len(p)) if common else 0.0

    em, f = [], []
    for answers, prediction in zip(targets, predictions, strict=True):
        p = normalize_trivia_qa(prediction)
        gold = [normalize_trivia_qa(a) for a in answers]
        em.append(max(g == p for g in gold))
        f.append(max(f1(g, p) for g in gold))
    return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f))}


def span_squad(targets: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD EM/F1 of "start: i end: j" predictions: the words i..j of the context (split at
    non-word characters) against the gold answers; an unreadable prediction is "". Targets are
    {"answers": [...], "context": text}."""
    if len(targets) != len(predictions) or not targets:
        raise UserError(f"span SQuAD needs one prediction per question, got {len(targets)} "
                        f"targets and {len(predictions)} predictions")

    def words(text: str) -> list[str]:
        return re.sub(r"\W", " ", text).split()

    def answer(context: list[str], prediction: str) -> str:
        tokens = words(prediction)
        try:
            start, end = int(tokens[1]), int(tokens[3])
        except (IndexError, ValueError):  # fewer than 4 words, or not numbers
            return ""
        return " ".join(context[start:end + 1])

    texts = [answer(words(t["context"]), p) for t, p in zip(targets, predictions, strict=True)]
    return squad([t["answers"] for t in targets], texts)


def record(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """ReCoRD: SQuAD EM/F1 (max over the answers) once per (passage, query) group, as the
    task writes one example per gold answer. Targets are {"value": [answers], "group"},
    predictions {"value": answer}."""
    seen, answers, guesses = set(), [], []
    for target, prediction in zip(targets, predictions, strict=True):
        if target["group"] in seen:
            continue
        seen.add(target["group"])
        answers.append(target["value"] or [""])
        guesses.append(prediction["value"])
    return squad(answers, guesses)


def multirc_f1a(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """MultiRC F1a: binary F1 over every answer option ({"value": class id}), reported as
    "f1" (T5's name)."""
    return f1_binary([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_em(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """MultiRC exact match: the share of questions (``group``, T5's key: the question's idx)
    whose options are all right."""
    right: dict[Hashable, bool] = {}
    for target, prediction in zip(targets, predictions, strict=True):
        group = target["group"]
        right[group] = right.get(group, True) and target["value"] == prediction["value"]
    if not right:
        raise UserError("MultiRC exact match needs at least one example")
    return {"exact_match": 100.0 * float(np.mean(list(right.values())))}


# --------------------------------------------------------------------------- generation


def rouge(targets: Sequence[str], predictions: Sequence[str],
          score_keys: Sequence[str] = ("rouge1", "rouge2", "rougeLsum"), *,
          use_stemmer: bool = False, bootstrap: bool = True, seed: int | None = 0
          ) -> dict[str, float]:
    """ROUGE F-measures in percent, as T5 reports them: no stemmer, and the median of
    rouge-score's 1000-sample bootstrap of the mean (``BootstrapAggregator``'s "mid"). For
    rougeLsum the sentences are the lines of each text; text with " . " between sentences is
    split there too (T5's convention for tokenised summaries).

    The bootstrap draws from numpy's global generator, as T5's does; ``seed`` (None: leave it
    alone) seeds it for this call only, so a score is reproducible and T5's own function gives
    the same number after ``np.random.seed(seed)``. ``use_stemmer=True, bootstrap=False`` is the
    lenient variant (Porter stemming, plain mean), whose scores run higher than T5's.
    """
    from rouge_score import rouge_scorer, scoring

    if len(targets) != len(predictions) or not targets:
        raise UserError(f"ROUGE needs one prediction per target, got {len(targets)} targets "
                        f"and {len(predictions)} predictions")
    scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=use_stemmer)
    scores = [scorer.score(t.replace(" . ", " .\n"), p.replace(" . ", " .\n"))
              for t, p in zip(targets, predictions, strict=True)]
    if not bootstrap:
        return {key: 100.0 * float(np.mean([s[key].fmeasure for s in scores]))
                for key in score_keys}
    aggregator = scoring.BootstrapAggregator()
    for s in scores:
        aggregator.add_scores(s)
    state = np.random.get_state() if seed is not None else None
    try:
        if seed is not None:
            np.random.seed(seed)
        result = aggregator.aggregate()
    finally:
        if state is not None:
            np.random.set_state(state)
    return {key: 100.0 * float(result[key].mid.fmeasure) for key in score_keys}


def bleu(targets: Sequence[str] | Sequence[Sequence[str]], predictions: Sequence[str],
         tokenize: str = "intl") -> dict[str, float]:
    """Corpus BLEU from sacrebleu (exponential smoothing, case-sensitive, ``intl`` tokeniser as
    T5 reports WMT); targets are one reference per prediction or a list of references each."""
    import sacrebleu

    if len(targets) != len(predictions) or not targets:
        raise UserError(f"BLEU needs one prediction per target, got {len(targets)} targets "
                        f"and {len(predictions)} predictions")
    if isinstance(targets[0], str):
        streams = [list(targets)]
    else:  # per-prediction reference lists -> sacrebleu's one stream per reference slot
        streams = [list(refs) for refs in zip(*targets, strict=True)]
    result = sacrebleu.corpus_bleu(list(predictions), streams, smooth_method="exp",
                                   lowercase=False, tokenize=tokenize)
    return {"bleu": float(result.score)}


def perplexity(log_likelihoods, weights=None) -> dict[str, float]:
    """exp of the mean negative log-likelihood per scored token (``weights`` 1 = scored);
    streams longer than a window go through ``perplexity.sliding_window_perplexity``."""
    ll = np.asarray(log_likelihoods, np.float64)
    w = np.ones_like(ll) if weights is None else np.asarray(weights, np.float64)
    count = float(w.sum())
    if count <= 0:
        raise UserError("perplexity needs at least one scored token")
    nll = -float((ll * w).sum()) / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


# --------------------------------------------------------------------------- ranking


def _hits(ranking: Sequence, relevant: Collection) -> np.ndarray:
    return np.array([doc in relevant for doc in ranking], dtype=float)


def reciprocal_rank(ranking: Sequence, relevant: Collection) -> float:
    """1 / rank of the first relevant document; 0 when none is retrieved."""
    hits = np.flatnonzero(_hits(ranking, relevant))
    return 1.0 / (hits[0] + 1) if hits.size else 0.0


def precision_at_k(ranking: Sequence, relevant: Collection, k: int) -> float:
    """Relevant documents among the top k, over k (a list shorter than k is padded with
    misses)."""
    return float(_hits(ranking[:k], relevant).sum()) / k


def average_precision(ranking: Sequence, relevant: Collection) -> float:
    """Mean of precision@i over the ranks i of the relevant documents, over all |relevant|
    (relevant documents never retrieved add precision 0); 0 when nothing is relevant."""
    if not relevant:
        return 0.0
    hits = _hits(ranking, relevant)
    precisions = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precisions * hits).sum()) / len(relevant)


def average_precision_at_k(ranking: Sequence, relevant: Collection, k: int) -> float:
    """AP of the top k: the sum of precision@i at relevant ranks i <= k over
    min(k, |relevant|), so a perfect top k scores 1."""
    if not relevant:
        return 0.0
    hits = _hits(ranking[:k], relevant)
    precisions = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precisions * hits).sum()) / min(k, len(relevant))


def ranking_metrics(rankings: Sequence[Sequence], relevant: Sequence[Collection],
                    ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """MRR, MAP, mean precision@k and mean AP@k over queries (a ranked list of document ids
    and the set of relevant ids each), as fractions."""
    if len(rankings) != len(relevant) or not rankings:
        raise UserError(f"ranking metrics need one relevant set per ranking, got "
                        f"{len(rankings)} rankings and {len(relevant)} sets")
    if any(k < 1 for k in ks):
        raise UserError(f"k must be at least 1, got {list(ks)}")
    pairs = list(zip(rankings, relevant, strict=True))
    out = {"mrr": float(np.mean([reciprocal_rank(r, s) for r, s in pairs])),
           "map": float(np.mean([average_precision(r, s) for r, s in pairs]))}
    for k in ks:
        out[f"precision@{k}"] = float(np.mean([precision_at_k(r, s, k) for r, s in pairs]))
        out[f"ap@{k}"] = float(np.mean([average_precision_at_k(r, s, k) for r, s in pairs]))
    return out


# --------------------------------------------------------------------------- rank classification

ScoreFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def sample_shots(pool: Sequence[tuple[str, str]], k: int, seed: int = 0) -> list[tuple[str, str]]:
    """k (input, label string) demonstrations drawn without replacement, fixed by ``seed``."""
    if not 0 <= k <= len(pool):
        raise UserError(f"cannot draw {k} in-context examples from a pool of {len(pool)}")
    return random.Random(seed).sample(list(pool), k)


def few_shot_prompt(text: str, shots: Sequence[tuple[str, str]] = (),
                    separator: str = "\n\n") -> str:
    """``text`` after k demonstrations written as "input label", one block each."""
    return separator.join([*(f"{x} {y}" for x, y in shots), text])


def rank_classification(score_fn: ScoreFn, inputs: Sequence[str], label_strings: Sequence[str],
                        *, shots: Sequence[tuple[str, str]] = (),
                        separator: str = "\n\n") -> tuple[np.ndarray, np.ndarray]:
    """Zero/few-shot classification: every (prompt, label string) pair is scored with
    ``score_fn(prompts, targets) -> log-likelihoods`` in one call and each input takes the
    label with the highest score. Returns (predicted class ids [N], scores [N, C])."""
    if not label_strings or not inputs:
        raise UserError("rank classification needs at least one input and one label string")
    prompts = [few_shot_prompt(x, shots, separator) for x in inputs]
    pair_inputs = [p for p in prompts for _ in label_strings]
    pair_targets = [label for _ in prompts for label in label_strings]
    scores = np.asarray(score_fn(pair_inputs, pair_targets), np.float64)
    if scores.shape != (len(pair_inputs),):
        raise UserError(f"score_fn must return one log-likelihood per pair "
                        f"({len(pair_inputs)}), got shape {scores.shape}")
    scores = scores.reshape(len(prompts), len(label_strings))
    return scores.argmax(axis=1), scores
