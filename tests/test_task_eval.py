"""``t5x-like eval --task/--mixture``: task metrics of a real (tiny) fine-tuned T5 checkpoint.

A tiny T5 is fine-tuned for 40 steps on ``glue_sst2`` with TFDS mock data (20 examples; mock
validation == mock train, so it is evaluated on 40 mock examples, half of them unseen, to
make its predictions imperfect), packed as the preset packs (``data.pack``), so its scoring
and rank classification are packed too. Every number the evaluation reports is recomputed here
outside ``task_eval``: the examples straight from ``tfds.load``, the input text from T5's
template, the decoding or scoring with the family's ``predict_batch`` / ``score_batch`` one
example at a time, and the metric with scikit-learn.
"""

import contextlib
import io
import json

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import ROOT
from sklearn.metrics import accuracy_score, f1_score

from t5x_like import cli
from t5x_like import config as config_lib
from t5x_like.evaluation import task_eval
from t5x_like.evaluation.driver import load_checkpoint
from t5x_like.train import train

STEPS = 40
LABELS = ("negative", "positive")  # TFDS's glue/sst2 class names, T5's targets
MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)
OVERRIDES = [
    "model.d_model=32", "model.d_kv=8", "model.num_heads=4", "model.d_ff=64",
    "model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.dropout_rate=0.0",
    "data.task=glue_sst2", "data.inputs_length=32", "data.batch_size=8",
    "finetune.targets_length=16",  # packed rows hold 3 label words ("negative" is 4 pieces + EOS)
    f"train.num_steps={STEPS}", "train.log_every=10", "train.eval_every=1000",
    f"train.checkpoint_every={STEPS}", "train.progress_bar=True",
    "optimizer.learning_rate=0.01",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5_sst2")
    bar = io.StringIO()  # the progress bar (tqdm writes to stderr)
    with tfds.testing.mock_data(num_examples=20, **MOCK), contextlib.redirect_stderr(bar):
        train(config_lib.load_config(str(ROOT / "configs/t5_finetune.py:tiny"), OVERRIDES), out)
    (out.parent / "progress_bar.txt").write_text(bar.getvalue())
    return out


@pytest.fixture(scope="module")
def loaded(workdir):
    return load_checkpoint(workdir)


@pytest.fixture(scope="module")
def one_by_one(loaded):
    """predict(text, max_length) -> text and score(input ids, target) -> log-likelihood, one
    example at a time, zero-padded to fixed shapes (32 inputs, 8 targets) so they compile once;
    padding is masked, so it changes nothing."""
    exp, params, _ = loaded
    decode = jax.jit(lambda x, n: exp.family.predict_batch(params, {"inputs": x}, max_length=n),
                     static_argnums=1)
    score_batch = jax.jit(exp.family.score_batch)

    def predict(text, max_length):
        tokens = np.asarray(decode(_pad(_ids(exp.vocabulary, text, 32), 32), max_length))
        tokens = tokens[0].tolist()
        return exp.vocabulary.decode(tokens[:tokens.index(1)] if 1 in tokens else tokens)

    def score(input_ids, target):
        return float(score_batch(params, {"inputs": _pad([input_ids], 32),
                                          "targets": _pad(_ids(exp.vocabulary, target), 8)})[0])

    return predict, score


@pytest.fixture
def mock40():
    with tfds.testing.mock_data(num_examples=40, **MOCK):
        yield


def _raw(builder, split):
    return list(tfds.as_numpy(tfds.load(builder, split=split, shuffle_files=False)))


def _ids(vocab, text, length=None):
    """[[ids + EOS]], the front kept when there are more than ``length``."""
    ids = list(vocab.encode(text))
    ids = ids[:length - 1] if length else ids
    return [[*ids, 1]]


def _pad(rows, width):
    out = np.zeros((len(rows), width), np.int32)
    for row, ids in zip(out, rows, strict=True):
        row[:len(ids)] = ids
    return out


def _vocab_ids(text):
    """The default vocabulary's ids of ``text`` + EOS (the checkpoint was trained with it)."""
    from t5x_like.data.vocab import get_vocabulary

    return [*get_vocabulary().encode(text), 1]


def _label(text):
    return LABELS.index(text) if text in LABELS else -1


# --------------------------------------------------------------------------- decoded metrics


def test_cli_task_metrics_equal_independent_decoding(workdir, one_by_one, mock40, tmp_path,
                                                     capsys):
    out = tmp_path / "report.json"
    assert cli.main(["eval", "--checkpoint", str(workdir), "--task", "glue_sst2",
                     "--split", "validation", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {"checkpoint", "step", "split", "mode", "shots", "beam_size",
                           "examples", "metrics"}
    assert (report["checkpoint"], report["step"], report["split"], report["mode"],
            report["beam_size"]) == (str(workdir), STEPS, "validation", "decode", 1)
    assert report["examples"] == {"glue_sst2": 40}  # 5 batches of 8, every example once
    assert list(report["metrics"]) == ["glue_sst2"]
    assert list(report["metrics"]["glue_sst2"]) == ["accuracy"]
    value = report["metrics"]["glue_sst2"]["accuracy"]
    assert f"{value:.3f}" in printed and "glue_sst2" in printed

    # The same predictions, decoded one example at a time from tfds's own examples.
    predict, _ = one_by_one
    raw = _raw("glue/sst2", "validation")
    # up to the longest target: "negative"/"positive" are 4 pieces + EOS
    assert {len(_vocab_ids(w)) for w in LABELS} == {5}
    guesses = [_label(predict("sst2 sentence: " + x["sentence"].decode(), 5)) for x in raw]
    truth = [int(x["label"]) for x in raw]
    # not a vacuous comparison: the model writes label words and is neither always right
    # nor always wrong on the 40 examples (20 of them unseen in training)
    assert sum(g in (0, 1) for g in guesses) >= 30
    assert 0 < accuracy_score(truth, guesses) < 1
    assert value == pytest.approx(100 * accuracy_score(truth, guesses), abs=1e-9)

    # TensorBoard: eval/<task>/<metric> at the checkpoint's step, in the run's tensorboard dir
    scalars = {}
    for path in (workdir / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    assert scalars[("eval/glue_sst2/accuracy", STEPS)] == pytest.approx(value, rel=1e-6)


def test_score_metric_fns_get_the_log_likelihood_of_each_target(loaded, one_by_one, mock40):
    from t5x_like.evaluation import metrics
    from t5x_like.tasks import register_t2t_task

    def mean_log_likelihood(targets, scores):
        return {"mean_ll": float(np.mean(scores)), "n": float(len(targets))}

    task = register_t2t_task("test_task_eval_scored", "tfds:glue/sst2:2.0.0",
                             inputs="sst2 sentence: {sentence}", label_names=LABELS,
                             metric_fns=[metrics.accuracy, mean_log_likelihood])
    try:
        exp, params, _ = loaded
        table, (result,) = task_eval.evaluate(
            exp, params, task.name, task_eval.Options(split="validation", num_batches=2))
        raw = _raw("glue/sst2", "validation")[:16]
        score = one_by_one[1]
        expected = [score(_ids(exp.vocabulary, "sst2 sentence: " + x["sentence"].decode(), 32)[0],
                          LABELS[x["label"]]) for x in raw]
        assert table[task.name]["n"] == 16  # --batches 2 x batch size 8
        predict = one_by_one[0]  # and the decoded texts, example by example
        assert result.outputs == [predict("sst2 sentence: " + x["sentence"].decode(), 5)
                                  for x in raw]
        assert result.targets == [int(x["label"]) for x in raw]
        assert result.predictions == [_label(o) for o in result.outputs]
        assert table[task.name]["mean_ll"] == pytest.approx(np.mean(expected), abs=1e-4)
        assert set(table[task.name]) == {"accuracy", "mean_ll", "n"}
    finally:
        seqio.TaskRegistry.remove("test_task_eval_scored")


def test_beam_search_decodes_as_predict_batch_with_the_same_options(tiny_config, mock40):
    """A T5 family (random weights) under beam search: the decoded texts are predict_batch's
    with decoding.Options(beam_size=3), up to the split's longest target (5 tokens)."""
    from t5x_like import decoding
    from t5x_like.experiment import build

    exp = build(tiny_config)
    params = exp.init_state()["params"]
    _, (result,) = task_eval.evaluate(exp, params, "glue_sst2", task_eval.Options(
        split="validation", num_batches=1, beam_size=3, alpha=0.6))
    raw = _raw("glue/sst2", "validation")[:8]
    inputs = _pad([_ids(exp.vocabulary, "sst2 sentence: " + x["sentence"].decode(), 32)[0]
                   for x in raw], 32)
    tokens = np.asarray(exp.family.predict_batch(
        params, {"inputs": inputs}, max_length=5,
        options=decoding.Options(beam_size=3, alpha=0.6)))
    expected = [exp.vocabulary.decode([t for t in row[:list(row).index(1)] if t] if 1 in row
                                      else [t for t in row if t]) for row in tokens.tolist()]
    assert result.outputs == expected
    assert any(text for text in expected)  # random weights still write something


# --------------------------------------------------------------------------- rank classification


@pytest.mark.parametrize("shots", [0, 2])
def test_rank_classification_is_the_argmax_of_score_batch(loaded, one_by_one, mock40, shots):
    exp, params, _ = loaded
    options = task_eval.Options(split="validation", rank_classification=True, shots=shots,
                                seed=3)
    table, (result,) = task_eval.evaluate(exp, params, "glue_sst2", options)
    assert list(table["glue_sst2"]) == [f"accuracy_rank_{shots}shot"]

    train_pairs = {("sst2 sentence: " + x["sentence"].decode(), LABELS[x["label"]])
                   for x in _raw("glue/sst2", "train")}
    assert len(result.shots) == shots and set(result.shots) <= train_pairs
    again = task_eval.evaluate(exp, params, "glue_sst2", options)[1][0]
    assert again.shots == result.shots  # fixed by the seed

    raw = _raw("glue/sst2", "validation")
    truth, guesses, scores = [], [], []
    for x in raw:  # one (prompt, label) pair at a time
        prompt = "\n\n".join([f"{a} {b}" for a, b in result.shots]
                             + ["sst2 sentence: " + x["sentence"].decode()])
        ids = list(exp.vocabulary.encode(prompt))  # 31 tokens + EOS: with demonstrations
        ids = (ids[-31:] if shots else ids[:31]) + [1]  # the front goes, else the end
        row = [one_by_one[1](ids, label) for label in LABELS]
        scores.append(row)
        guesses.append(int(np.argmax(row)))
        truth.append(int(x["label"]))
    np.testing.assert_allclose(result.scores, scores, atol=1e-4)
    assert np.min(np.abs(np.diff(scores, axis=1))) > 1e-3  # no near-ties to flip an argmax
    assert result.outputs == [LABELS[g] for g in guesses]
    # the margin depends on the input: the scores are the model's, not a constant answer (a
    # 40-step tiny model may still pick one label for every input of this small mock split)
    margins = np.diff(scores, axis=1).ravel()
    assert np.ptp(margins) > 1e-3
    assert table["glue_sst2"][f"accuracy_rank_{shots}shot"] == pytest.approx(
        100 * accuracy_score(truth, guesses), abs=1e-9)


# --------------------------------------------------------------------------- packed scoring


def test_packed_run_reports_its_packing_efficiency(workdir, loaded):
    """The fixture's run packed its rows (the tiny preset's data.pack=True): the log and the
    progress bar report real tokens / row tokens, recomputed here from its first 10 batches."""
    exp, _, _ = loaded
    assert exp.config.data.pack
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    reported = next(m for m in logged if m["step"] == 10)["train/packing/efficiency"]
    with tfds.testing.mock_data(num_examples=20, **MOCK):
        stream = exp.family.batches(split="train", batch_size=8, shuffle=True, repeat=True,
                                    skip_batches=0, shard_index=0, num_shards=1)
        first = [next(stream) for _ in range(10)]
    real = sum(int(np.sum(b["inputs"] != 0) + np.sum(b["targets"] != 0)) for b in first)
    assert max(int(b["inputs_segment_ids"].max()) for b in first) >= 2  # packed rows
    assert reported == pytest.approx(real / (10 * 8 * (32 + 16)), rel=1e-5)
    bar = (workdir.parent / "progress_bar.txt").read_text()
    assert f"pack={reported:.2f}" in bar


def test_packed_scoring_equals_one_pair_per_row(workdir, mock40):
    """The fixture's run fine-tuned packed (the tiny preset's data.pack=True), so eval packs its
    (prompt, label) pairs too; the same checkpoint with data.pack=false scores one pair a row.
    Every pair's log-likelihood, every chosen label and the task metrics must agree. Rows of
    128 inputs (the prompts are at most 22 tokens, so none is cut either way) hold several
    pairs; rows of the run's 32 would hold about one."""
    wider = ["data.inputs_length=128"]
    exp, params, _ = load_checkpoint(workdir, wider)
    exp_u, params_u, _ = load_checkpoint(workdir, [*wider, "data.pack=false"])
    assert exp.config.data.pack and not exp_u.config.data.pack
    options = task_eval.Options(split="validation", rank_classification=True)
    task = task_eval.member_tasks("glue_sst2")[0][0]
    packed, alone = task_eval.Runner(exp, params), task_eval.Runner(exp_u, params_u)
    result_p = task_eval.evaluate_task(packed, task, options)
    result_u = task_eval.evaluate_task(alone, task, options)
    assert result_p.scores.shape == result_u.scores.shape == (40, 2)
    np.testing.assert_allclose(result_p.scores, result_u.scores, rtol=1e-5, atol=1e-5)
    assert np.min(np.abs(np.diff(result_u.scores, axis=1))) > 1e-4  # no tie decides a label
    assert result_p.outputs == result_u.outputs
    assert result_p.metrics == result_u.metrics
    # packed for real: 80 pairs in 2 batches of 8 rows, against 10 batches one pair a row
    assert alone.rows_scored == 80 and packed.rows_scored <= 16, packed.rows_scored


# --------------------------------------------------------------------------- mixtures


def test_mixture_reports_each_task_and_t5s_average(workdir, one_by_one, mock40, tmp_path):
    from t5x_like.tasks import register_mixture

    register_mixture("test_task_eval_pair", ["glue_sst2", "glue_mrpc"])
    try:
        out = tmp_path / "mixture.json"
        assert cli.main(["eval", "--checkpoint", str(workdir), "--mixture",
                         "test_task_eval_pair", "--batches", "1", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
    finally:
        seqio.MixtureRegistry.remove("test_task_eval_pair")
    metrics = report["metrics"]
    assert set(metrics) == {"glue_sst2", "glue_mrpc", "test_task_eval_pair"}
    assert report["examples"] == {"glue_sst2": 8, "glue_mrpc": 8}
    sst2, mrpc = metrics["glue_sst2"], metrics["glue_mrpc"]
    assert set(mrpc) == {"f1", "accuracy"}
    # T5's GLUE score: a task's metrics averaged first, then the tasks
    assert metrics["test_task_eval_pair"] == {
        "average": pytest.approx((sst2["accuracy"] + (mrpc["f1"] + mrpc["accuracy"]) / 2) / 2)}

    # MRPC on its own, independently: decode the first batch, F1 and accuracy from sklearn
    names = ("not_equivalent", "equivalent")
    raw = _raw("glue/mrpc", "validation")[:8]
    longest = max(len(_vocab_ids(names[x["label"]])) for x in raw)
    truth, guesses = [], []
    for x in raw:
        word = one_by_one[0](f"mrpc sentence1: {x['sentence1'].decode()} "
                             f"sentence2: {x['sentence2'].decode()}", longest)
        guesses.append(names.index(word) if word in names else -1)
        truth.append(int(x["label"]))
    assert mrpc["accuracy"] == pytest.approx(100 * accuracy_score(truth, guesses))
    # T5's F1 with invalid predictions: a non-label answer is the wrong class
    fixed = [g if g in (0, 1) else 1 - t for t, g in zip(truth, guesses, strict=True)]
    assert mrpc["f1"] == pytest.approx(100 * f1_score(truth, fixed, zero_division=0))


def test_mixture_leaves_out_training_only_members():
    """T5's SuperGLUE mixture trains on simple WSC, which has no metrics (seqio's evaluator
    skips it); DPR has metrics but no validation split, so ``evaluate`` skips it there."""
    tasks, is_mixture = task_eval.member_tasks("super_glue_proportional")
    names = {t.name for t in tasks}
    assert is_mixture and "super_glue_wsc_simple_train" not in names
    assert {"super_glue_boolq", "super_glue_record", "dpr_simple"} <= names
    by_split = {t.name for t in task_eval.member_tasks("super_glue_proportional",
                                                        "validation")[0]}
    assert by_split == names - {"dpr_simple"}


# --------------------------------------------------------------------------- bad requests


def test_bad_requests_stop_with_one_line(workdir, mock40, capsys):
    assert cli.main(["eval", "--checkpoint", str(workdir), "--task", "glue_sst2",
                     "--shots", "2"]) == 2
    assert "add --rank-classification" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(workdir), "--task", "glue_stsb",
                     "--rank-classification"]) == 2
    assert "label words" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(workdir), "--mixture", "glue_sst3"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(workdir), "--task", "glue_sst2",
                     "--beam-size", "2"]) == 2  # t5_finetune's predict_batch is greedy only
    assert "decodes greedily only" in capsys.readouterr().err
