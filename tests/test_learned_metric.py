"""The learned metric (BLEURT-style): synthetic pairs and their targets, ratings files, the pair
task's encoder rows, a real training run whose loss falls, and ``t5x-like eval --metric``.

Targets are recomputed here with sacrebleu and rouge-score directly; the encoder rows are
checked token by token against the vocabulary's own encoding of each side.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import ROOT

from t5x_like import cli
from t5x_like import config as config_lib
from t5x_like.data import corpus, metric_pairs
from t5x_like.errors import UserError
from t5x_like.evaluation import learned_metric

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "model.num_layers=1", "data.inputs_length=48", "data.batch_size=16",
        "train.num_steps=40", "train.eval_every=40", "train.eval_batches=0",
        "train.checkpoint_every=40", "train.progress_bar=False", "train.log_every=1",
        "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=5"]


@pytest.fixture(scope="module")
def texts():
    return corpus.default_corpus_texts("train")[:400]


def test_synthetic_pairs_are_seeded_and_their_targets_are_bleu_and_rouge(texts):
    import sacrebleu
    from rouge_score import rouge_scorer

    pairs = metric_pairs.synthetic_pairs(texts, num_pairs=40, seed=3)
    assert pairs == metric_pairs.synthetic_pairs(texts, num_pairs=40, seed=3)
    assert pairs != metric_pairs.synthetic_pairs(texts, num_pairs=40, seed=4)
    sentences = set(metric_pairs.corpus_sentences(texts))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for p in pairs:
        assert p.reference in sentences
        assert metric_pairs.MIN_WORDS <= len(p.reference.split()) <= metric_pairs.MAX_WORDS
        bleu = sacrebleu.sentence_bleu(p.candidate, [p.reference]).score / 100
        rouge = scorer.score(p.reference, p.candidate)
        expected = (bleu + sum(rouge[k].fmeasure for k in ("rouge1", "rouge2", "rougeL"))) / 4
        assert p.score == pytest.approx(expected, abs=1e-12)
    scores = [p.score for p in pairs]
    assert min(scores) < 0.3 and max(scores) == pytest.approx(1.0)  # copies score 1
    assert any(p.candidate != p.reference for p in pairs)


def test_perturbations_keep_or_remove_words_as_named():
    rng = random.Random(0)
    words = "one two three four five six seven eight".split()
    for _ in range(20):
        dropped = metric_pairs.drop_words(words, rng)
        assert dropped and all(w in words for w in dropped) and len(dropped) <= len(words)
        swapped = metric_pairs.swap_words(words, rng)
        assert sorted(swapped) == sorted(words) and swapped != words
        replaced = metric_pairs.replace_span(words, ["A", "B", "C", "D", "E"], rng)
        assert len(replaced) == len(words) and set(replaced) - set(words) <= set("ABCDE")


def test_ratings_files(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("reference\tcandidate\tscore\na b\ta c\t3.5\nx y\tx y z\t1\n")
    rows = metric_pairs.read_ratings(path)
    assert sum(len(v) for v in rows.values()) == 2 and set(rows) <= {"train", "validation"}
    pairs = [metric_pairs.Pair("a b", "a c", 0.25)]
    assert metric_pairs.read_ratings(metric_pairs.write_ratings(tmp_path / "w.tsv", pairs,
                                                                split="test")) == {"test": pairs}
    path.write_text("a\tb\tnot-a-number\nc\td\n")
    with pytest.raises(UserError, match=r"r.tsv:2 must read reference<TAB>candidate"):
        metric_pairs.read_ratings(path)
    shipped = metric_pairs.read_ratings(ROOT / "t5x_like/data/sick_relatedness.tsv")
    assert {k: len(v) for k, v in shipped.items()} == {"train": 2000, "validation": 495,
                                                       "test": 1000}
    assert all(1.0 <= p.score <= 5.0 for v in shipped.values() for p in v)


@pytest.mark.parametrize("content, message", [
    (b"reference\tcandidate\tscore\na\xff b\tc\t1\n", r"not UTF-8 text \(line 2: byte 0xff\)"),
    (b"a b\tc d\tnan\n", r"r.tsv:1 has score 'nan'; a rating must be a finite number"),
    (b"a b\tc d\t1\na b\t \t2\n", r"r.tsv:2 has an empty candidate"),
    (b"a b\tc d\t1\ttrain\na b\tc\t2\t\n", r"r.tsv:2 has an empty split column"),
    (b"\n\n", r"holds no rows"),
])
def test_bad_ratings_files_stop_in_one_sentence(tmp_path, content, message):
    path = tmp_path / "r.tsv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        metric_pairs.read_ratings(path)


def test_text_files_are_utf8_lines_or_one_sentence(tmp_path, capsys):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"the cat\r\n\r\nsat\r\n")
    assert learned_metric.read_lines(crlf) == ["the cat", "", "sat"]
    for name, content, message in [("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
                                   ("empty.txt", b"\n", "is empty")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message):
            learned_metric.read_lines(tmp_path / name)
    with pytest.raises(UserError, match="is not a file"):
        learned_metric.read_lines(tmp_path)
    assert cli.main(["eval", "--metric", "bleu", "--references", str(crlf), "--predictions",
                     str(tmp_path / "latin1.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith("save it as UTF-8")
    assert cli.main(["eval", "--metric", "rouge", "--ratings", str(tmp_path / "none.tsv")]) == 2
    assert "ratings file" in capsys.readouterr().err


def test_bleu_and_rouge_per_pair_are_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    references = ["the cat sat on the mat", "to be or not to be", "all is well"]
    candidates = ["the cat sat on a mat", "be not to", "well"]
    bleu = learned_metric.per_pair("bleu", references, candidates)
    rouge = learned_metric.per_pair("rouge", references, candidates)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for i, (r, c) in enumerate(zip(references, candidates, strict=True)):
        assert bleu[i] == sacrebleu.sentence_bleu(c, [r]).score
        assert rouge[i] == scorer.score(r, c)["rougeL"].fmeasure
    assert 0 < bleu[0] < 100 and 0 < rouge[1] < 1
    with pytest.raises(UserError, match="at least one metric"):
        learned_metric.score_texts([], references, candidates)


def test_pair_task_rows_are_cls_reference_sep_candidate_sep():
    from t5x_like.data.special_tokens import special_tokens
    from t5x_like.experiment import build
    from t5x_like.tasks import ratings

    config = config_lib.load_config(str(ROOT / "configs/learned_metric.py:tiny_finetune"),
                                    [*TINY, "data.batch_size=4"])
    exp = build(config)
    batch = next(iter(exp.family.batches(split="test", batch_size=4, shuffle=False,
                                         repeat=False, skip_batches=0, shard_index=0,
                                         num_shards=1)))
    pairs = metric_pairs.read_ratings(ratings.SICK_FILE)["test"][:4]
    vocab, special = exp.vocabulary, special_tokens(exp.vocabulary)
    for i, p in enumerate(pairs):
        ids = batch["input_ids"][i][batch["attention_mask"][i] > 0].tolist()
        first, second = metric_pairs.pair_lengths(48)  # each side cut to fit 48 tokens
        reference = vocab.encode(p.reference)[:first]
        candidate = vocab.encode(p.candidate)[:second]
        assert ids == [special.cls, *reference, special.sep, *candidate, special.sep]
        # eval builds the same rows
        assert ids == learned_metric.pair_row(vocab, p.reference, p.candidate, length=48,
                                              cls=special.cls, sep=special.sep)
        assert batch["label"][i] == pytest.approx((p.score - 1) / 4, abs=1e-4)


def test_a_tiny_run_trains_and_eval_scores_each_prediction(tmp_path, capsys):
    from t5x_like.tasks import ratings
    from t5x_like.train import train

    ratings.register_synthetic_task("metric_pairs_tiny", num_pairs={"train": 256,
                                                                    "validation": 16})
    config = config_lib.load_config(str(ROOT / "configs/learned_metric.py:tiny"),
                                    [*TINY, "data.task=metric_pairs_tiny"])
    workdir = tmp_path / "metric"
    train(config, workdir)
    losses = [json.loads(line)["train/loss"] for line in
              (workdir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:3])

    refs, preds = tmp_path / "refs.txt", tmp_path / "preds.txt"
    refs.write_text("the cat sat on the mat\nTo be, or not to be\nall is well\n")
    preds.write_text("the cat sat on the mat\nbe not to\nwell\n")
    out_json = tmp_path / "scores.json"
    assert cli.main(["eval", "--metric", f"learned:{workdir}", "--metric", "bleu",
                     "--metric", "rouge", "--references", str(refs), "--predictions",
                     str(preds), "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(len(r) == 4 for r in rows)
    report = json.loads(out_json.read_text())
    learned = report["per_pair"][f"learned:{workdir}"]
    assert [float(r[1]) for r in rows] == pytest.approx(learned, abs=1e-4)
    assert report["per_pair"]["bleu"][0] == pytest.approx(100.0)
    assert report["mean"][f"learned:{workdir}"] == pytest.approx(np.mean(learned))


def test_bad_metric_requests_stop_in_one_sentence(tmp_path, capsys):
    refs = tmp_path / "r.txt"
    refs.write_text("a\nb\n")
    assert cli.main(["eval", "--metric", "blue", "--references", str(refs),
                     "--predictions", str(refs)]) == 2
    assert "the kind must be one of" in capsys.readouterr().err
    assert cli.main(["eval", "--metric", "bleu", "--references", str(refs)]) == 2
    assert "--predictions FILE" in capsys.readouterr().err
    short = tmp_path / "s.txt"
    short.write_text("a\n")
    assert cli.main(["eval", "--metric", "bleu", "--references", str(refs),
                     "--predictions", str(short)]) == 2
    assert "one reference per prediction" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs a folder"):
        learned_metric.parse_spec("learned:")
    assert learned_metric.correlations([1, 2, 3, 4], [1, 3, 2, 4])["kendall"] == \
        pytest.approx(2 / 3)
    assert np.isnan(list(learned_metric.correlations([1, 2, 3], [0.5] * 3).values())).all()
    with pytest.raises(UserError, match="human scores are all 3; a correlation needs"):
        learned_metric.correlations([3, 3, 3], [1, 2, 3])
    with pytest.raises(UserError, match="pair 1 holds a tab"):
        metric_pairs.write_ratings(tmp_path / "w.tsv", [metric_pairs.Pair("a", "b", 1),
                                                        metric_pairs.Pair("a\tb", "c", 2)])


@pytest.mark.slow  # ~100 s on 2 quiet cores: 300 steps of the tiny preset on SICK's train pairs
def test_after_fine_tuning_on_ratings_better_candidates_score_higher(tmp_path):
    """Fine-tuned on SICK's train ratings (from random weights), the metric ranks SICK's test
    pairs: the pairs people rated related (>= 4.5 of 5) score above those rated unrelated
    (<= 2), and its Pearson correlation with the ratings is positive."""
    from t5x_like.tasks import ratings
    from t5x_like.train import train

    config = config_lib.load_config(str(ROOT / "configs/learned_metric.py:tiny_finetune"), [
        "train.num_steps=300", "train.eval_every=300", "train.eval_batches=0",
        "train.checkpoint_every=300", "train.progress_bar=False", "train.log_every=50"])
    workdir = tmp_path / "metric"
    train(config, workdir)
    test = metric_pairs.read_ratings(ratings.SICK_FILE)["test"]
    scores = learned_metric.LearnedMetric(workdir).score([p.reference for p in test],
                                                         [p.candidate for p in test])
    human = np.array([p.score for p in test])
    assert scores[human >= 4.5].mean() > scores[human <= 2.0].mean() + 0.1
    assert learned_metric.correlations(human, scores)["pearson"] > 0.2
