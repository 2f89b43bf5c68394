"""The regression and span-QA heads trained by the real loop on a TFDS task and evaluated by
the eval driver, whose numbers are recomputed here in NumPy from the head's outputs on the
same validation batch. STS-B's rows come from TFDS's own mock generator; SQuAD's random mock
strings never contain their answer, so its rows are written here in SQuAD's feature layout
(an answer that occurs in its context), served through TFDS's ``as_dataset_fn`` mock."""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import ROOT

from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.evaluation.driver import evaluate_checkpoint, load_checkpoint
from t5x_like.evaluation.loop import device_batches
from t5x_like.experiment import build

SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32",
         "model.num_layers=1", "data.inputs_length=32", "data.batch_size=4",
         "train.num_steps=4", "train.eval_every=4", "train.eval_batches=1",
         "train.checkpoint_every=4", "train.progress_bar=False", "train.log_every=1",
         "finetune.label_names=()", "finetune.pooling=cls"]


def _train_and_eval(config_file, head, task, workdir, *extra, **mock):
    from t5x_like.train import train

    mock = mock or {"policy": tfds.testing.MockPolicy.USE_CODE}
    with tfds.testing.mock_data(num_examples=16, **mock):
        config = config_lib.load_config(
            str(ROOT / config_file), [*SMALL, f"finetune.head={head}", f"data.task={task}", *extra])
        result = train(config, workdir)
        report = evaluate_checkpoint(workdir, num_batches=1, baseline=False)
        exp, params, step = load_checkpoint(workdir)
        batch = jax.device_get(next(device_batches(exp, split=exp.config.data.eval_split,
                                                   repeat=False, shuffle=False)))
        out = np.asarray(exp.family.outputs(params, batch), np.float64)
    assert result["step"] == step == report["step"] == 4
    assert report["task"] == task and "eval/loss" in result
    return report, batch, out


def test_regression_head_on_stsb(tmp_path):
    report, batch, out = _train_and_eval("configs/bert_classify.py:tiny", "regression",
                                         "glue_stsb", tmp_path / "stsb")
    valid = batch["valid"] > 0
    err = out[:, 0] - batch["label"]
    assert report["tokens"] == valid.sum() > 0
    assert 0.0 <= batch["label"][valid].min() and batch["label"][valid].max() <= 5.0  # STS-B
    np.testing.assert_allclose(report["squared_error"], np.mean(err[valid] ** 2), rtol=1e-5)
    np.testing.assert_allclose(report["abs_error"], np.mean(np.abs(err[valid])), rtol=1e-5)
    np.testing.assert_allclose(report["loss"], report["squared_error"], rtol=1e-7)
    assert isinstance(report["loss"], float)  # the JSON-lines log took it


def _logsumexp(x, axis=-1):
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


COLOURS = ["red", "green", "blue", "grey"]
ANIMALS = ["fox", "cat", "horse", "owl"]
PLACES = ["hill", "roof", "wall", "bridge"]


def _squad_rows(self, split, *args, **kwargs):
    """16 SQuAD v1.1-shaped examples whose answer (a place) occurs in the context."""
    rows = [(c, a, PLACES[(i + j) % 4]) for i, c in enumerate(COLOURS)
            for j, a in enumerate(ANIMALS)]
    context = [f"The {c} {a} sat on the {p} all day." for c, a, p in rows]
    starts = [[x.index(p)] for x, (_, _, p) in zip(context, rows, strict=True)]
    return tf.data.Dataset.from_tensor_slices({
        "id": [f"q{i}" for i in range(len(rows))],
        "title": ["Animals"] * len(rows),
        "context": context,
        "question": [f"Where did the {c} {a} sit?" for c, a, _ in rows],
        "answers": {"text": [[p] for _, _, p in rows],
                    "answer_start": starts},
    })


def test_span_qa_head_on_squad(tmp_path):
    report, batch, out = _train_and_eval("configs/bert_squad.py:tiny", "span_qa", "squad_v1",
                                         tmp_path / "squad", "data.pack=False",
                                         as_dataset_fn=_squad_rows)
    valid = batch["valid"] > 0
    keep = batch["attention_mask"] > 0
    s = np.where(keep, out[..., 0], -np.inf)
    e = np.where(keep, out[..., 1], -np.inf)
    assert s.ndim == 2, s.shape  # one example per row (packing is off here)
    start, end = batch["start"], batch["end"]
    rows = np.arange(len(start))
    assert report["tokens"] == valid.sum() > 0
    assert np.all(end[valid] >= start[valid])
    ce = 0.5 * (_logsumexp(s) - s[rows, start] + _logsumexp(e) - e[rows, end])
    both = (s.argmax(-1) == start) & (e.argmax(-1) == end)
    np.testing.assert_allclose(report["loss"], ce[valid].mean(), rtol=1e-4)
    np.testing.assert_allclose(report["accuracy"], both[valid].mean(), atol=1e-7)


def test_a_task_whose_answers_are_never_in_the_inputs_stops_in_one_sentence():
    """TFDS's random SQuAD strings never contain their answer: every example is skipped.
    Read repeatedly, that stream once hung training forever before its first batch."""

    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        config = config_lib.load_config(str(ROOT / "configs/bert_squad.py:tiny"), SMALL)
        batches = build(config).family.batches(split="train", batch_size=4, shuffle=True,
                                               repeat=True, skip_batches=0, shard_index=0,
                                               num_shards=1)
        with pytest.raises(UserError, match=r"^1000 examples in a row of task 'squad_v1' were "
                           r"skipped for finetune.head='span_qa': the answer's tokens do not "
                           r"occur in the first 32 input tokens"):
            next(batches)
        batches.close()  # inside the mock: its reader must not outlive it
