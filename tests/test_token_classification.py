"""Token classification (NER) on CoNLL-2003 from TFDS (mock data from TFDS's own generator):
the task's pieces and first-piece labels against the words tokenised one by one, span-level
F1 from seqeval against its README's example and a conlleval-style span count written here,
and a head trained by the real loop and scored by ``evaluate_checkpoint``, whose span F1 is
recomputed here from the head's outputs."""

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT

from t5x_like import config as config_lib
from t5x_like.evaluation import tagging
from t5x_like.tasks.ner import CONLL2003_TAGS

SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32",
         "model.num_layers=1", "data.inputs_length=32", "data.batch_size=4",
         "train.num_steps=6", "train.eval_every=6", "train.eval_batches=1",
         "train.checkpoint_every=6", "train.progress_bar=False", "train.log_every=1",
         "optimizer.warmup_steps=1", "optimizer.learning_rate=0.01"]


def _mock():
    return tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE)


def spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """conlleval's chunks: B-X opens one; I-X opens one after O or another type; O, B and a
    type change close the open one."""
    out, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        if start is not None and (prefix in ("O", "B") or name != kind):
            out.add((start, i, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, name
    return out


def f1_by_hand(gold, predicted) -> float:
    g = {(n, *s) for n, seq in enumerate(gold) for s in spans(seq)}
    p = {(n, *s) for n, seq in enumerate(predicted) for s in spans(seq)}
    hit = len(g & p)
    return 0.0 if hit == 0 else 2 * hit / (len(g) + len(p))


def test_span_f1_is_seqevals_and_counts_whole_spans():
    # seqeval's README example: one of two MISC/PER spans has the wrong boundary -> 0.5.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    guess = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = tagging.span_scores(gold, guess)
    assert scores == {"span_precision": 0.5, "span_recall": 0.5, "span_f1": 0.5}
    rng = np.random.default_rng(0)
    names = np.array(CONLL2003_TAGS)
    gold = [list(names[rng.integers(0, 9, rng.integers(1, 20))]) for _ in range(300)]
    guess = [[t if rng.random() < 0.7 else str(rng.choice(names)) for t in seq] for seq in gold]
    assert tagging.span_scores(gold, guess)["span_f1"] == pytest.approx(f1_by_hand(gold, guess))


def test_conll_rows_label_each_words_first_piece():
    import t5x_like.tasks  # noqa: F401
    from t5x_like.finetune.data import examples
    from t5x_like.tasks.pretraining import default_vocabulary

    vocabulary = default_vocabulary()
    with _mock():
        raw = list(tfds.as_numpy(tfds.load("conll2003", split="validation", shuffle_files=False)))
        rows = list(examples("conll2003_ner", split="validation", lengths={"inputs": None,
                             "targets": None}, seed=0, shuffle=False, repeat=False))
    assert len(rows) == len(raw) == 12
    for ex, row in zip(raw, rows, strict=True):
        n = min(len(ex["tokens"]), len(ex["ner"]))
        ids, labels = [], []
        for word, tag in zip(ex["tokens"][:n], ex["ner"][:n], strict=True):
            pieces = vocabulary.encode(word.decode())
            ids += pieces
            labels += [int(tag)] + [-1] * (len(pieces) - 1) if pieces else []
        assert row["inputs"].tolist() == ids
        assert row["token_labels"].tolist() == labels
        assert row["targets"].size == 0


def test_ner_head_trains_and_eval_reports_span_f1(tmp_path):
    from t5x_like.evaluation.driver import evaluate_checkpoint, load_checkpoint
    from t5x_like.evaluation.loop import device_batches
    from t5x_like.train import train

    os.chdir(ROOT)
    with _mock():
        config = config_lib.load_config("configs/bert_ner.py:tiny", SMALL)
        result = train(config, tmp_path / "ner")
        report = evaluate_checkpoint(tmp_path / "ner", num_batches=2, baseline=False)
        exp, params, step = load_checkpoint(tmp_path / "ner")
        batches = list(device_batches(exp, split="validation", repeat=False, shuffle=False))[:2]
        outputs = [np.asarray(exp.family.outputs(params, b)) for b in batches]
    assert result["step"] == step == report["step"] == 6 and np.isfinite(result["eval/loss"])
    gold, guess = [], []
    for batch, out in zip(batches, outputs, strict=True):
        batch = jax.device_get(batch)
        assert out.shape == (4, 32, 9)
        for r in np.flatnonzero(batch["valid"]):
            keep = batch["token_labels"][r] >= 0
            gold.append([CONLL2003_TAGS[i] for i in batch["token_labels"][r][keep]])
            guess.append([CONLL2003_TAGS[i] for i in out[r].argmax(-1)[keep]])
    assert report["span_examples"] == len(gold) == 8
    assert report["span_words"] == sum(map(len, gold)) == report["tokens"]
    assert report["span_f1"] == pytest.approx(f1_by_hand(gold, guess), abs=1e-9)
    for name in ("span_precision", "span_recall", "span_f1", "accuracy"):
        assert 0.0 <= report[name] <= 1.0
