"""seqio registrations: the default task, text and TFDS tasks, mixtures and their rates."""

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("T5X_LIKE_CACHE", str(ROOT / ".cache" / "t5x_like"))

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from t5x_like import tasks  # noqa: E402
from t5x_like.data import corpus  # noqa: E402
from t5x_like.data.vocab import get_vocabulary  # noqa: E402
from t5x_like.errors import UserError  # noqa: E402

EOS = 1


@pytest.fixture
def cleanup():
    """Names registered by a test; removed afterwards so tests do not leak into each other."""
    names = []
    yield names
    for name in names:
        seqio.MixtureRegistry.remove(name)
        seqio.TaskRegistry.remove(name)


def chunks(task_name, length, split="train", limit=None):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset({"targets": length}, split=split, shuffle=False, num_epochs=1,
                          try_in_mem_cache=False)
    if limit:
        ds = ds.take(limit)
    return [ex["targets"] for ex in ds.as_numpy_iterator()]


def documents(token_chunks):
    """The EOS-terminated documents of a chunk stream (the last, cut one dropped)."""
    stream = np.concatenate(token_chunks).tolist()
    docs, start = [], 0
    for i, t in enumerate(stream):
        if t == EOS:
            docs.append(stream[start:i])
            start = i + 1
    return docs


def test_default_task_yields_exact_chunks_of_eos_separated_speeches():
    task = seqio.get_mixture_or_task(tasks.DEFAULT_TASK)
    assert sorted(task.splits) == ["train", "validation"]
    assert task.output_features["targets"].add_eos
    out = chunks(tasks.DEFAULT_TASK, 64, limit=40)
    assert len(out) == 40 and all(c.shape == (64,) and c.dtype == np.int32 for c in out)
    vocab = get_vocabulary()
    texts = corpus.default_corpus_texts("train")
    docs = documents(out)
    assert len(docs) > 5
    assert [vocab.decode(d) for d in docs] == texts[: len(docs)]
    assert 0 not in np.concatenate(out)  # no padding anywhere: the stream is packed


def test_default_task_validation_split_drops_only_the_remainder():
    out = chunks(tasks.DEFAULT_TASK, 128, split="validation")
    vocab = get_vocabulary()
    texts = corpus.default_corpus_texts("validation")
    total = sum(len(vocab.encode(t)) + 1 for t in texts)
    assert len(out) == total // 128


def test_mixture_rates_follow_t5_formula(cleanup):
    vocab = seqio.PassThroughVocabulary(size=10)
    for n in (100, 1000, 10000):
        name = f"rates_{n}"
        cleanup.append(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files: tf.data.Dataset.from_tensors({"targets": [1]}),
                splits=["train"], num_input_examples={"train": n}),
            output_features={"targets": seqio.Feature(vocab, dtype=tf.int64)},
        )
    cleanup.append("rates_mix")
    tasks.register_mixture("rates_mix", ["rates_100", "rates_1000", "rates_10000"],
                           cap=2000, temperature=2.0)
    rates = tasks.mixing_rates("rates_mix")
    raw = [min(n, 2000) ** 0.5 for n in (100, 1000, 10000)]
    expected = [r / sum(raw) for r in raw]
    assert list(rates.values()) == pytest.approx(expected, abs=1e-9)
    # The formula is T5's (Raffel et al., 2020, JMLR 21(140), §3.5.2: examples-proportional
    # mixing with limit K, each rate raised to 1/T and renormalised); for these sizes it gives
    # 0.1158 / 0.3662 / 0.5179.
    assert list(rates.values()) == pytest.approx([0.1158, 0.3662, 0.5179], abs=1e-4)
    tasks.register_mixture("rates_mix", ["rates_100", "rates_10000"])  # replaced: T=1, no cap
    assert tasks.mixing_rates("rates_mix") == pytest.approx(
        {"rates_100": 100 / 10100, "rates_10000": 10000 / 10100})
    row = next(r for r in tasks.list_tasks() if r["name"] == "rates_mix")
    assert row["kind"] == "mixture" and row["rates"]["rates_100"] == pytest.approx(0.0099, abs=1e-4)


def test_register_mixture_errors(cleanup):
    with pytest.raises(UserError, match="did you mean shakespeare"):
        tasks.register_mixture("bad_mix", ["shakespear"])
    with pytest.raises(UserError, match="already a task"):
        tasks.register_mixture(tasks.DEFAULT_TASK, [tasks.DEFAULT_TASK])
    with pytest.raises(UserError, match="temperature"):
        tasks.register_mixture("bad_mix", [tasks.DEFAULT_TASK], temperature=0)
    assert "bad_mix" not in seqio.MixtureRegistry.names()


def test_register_text_task_from_a_folder(tmp_path, cleanup):
    lines = [f"This is line number {i} of the tiny corpus." for i in range(300)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:150]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[150:]) + "\n\n")
    cleanup.append("tiny_text")
    task = tasks.register_text_task("tiny_text", str(tmp_path), validation_fraction=0.1)
    assert seqio.get_mixture_or_task("tiny_text") is task
    n_train, n_val = task.num_input_examples("train"), task.num_input_examples("validation")
    assert n_train + n_val == 300 and 10 < n_val < 60
    out = chunks("tiny_text", 32)
    assert all(c.shape == (32,) for c in out)
    vocab = get_vocabulary()
    train_lines = corpus.split_texts(lines, "train", 0.1)
    decoded = [vocab.decode(d) for d in documents(out)]
    assert decoded == train_lines[: len(decoded)] and len(decoded) > n_train - 10
    row = next(r for r in tasks.list_tasks() if r["name"] == "tiny_text")
    assert row == {"name": "tiny_text", "kind": "task", "splits": ["train", "validation"],
                   "source": str(tmp_path)}
    # Registering the name again replaces the task.
    (tmp_path / "c.txt").write_text("one more line\n")
    again = tasks.register_text_task("tiny_text", str(tmp_path / "c.txt"),
                                     validation_fraction=None)
    assert seqio.get_mixture_or_task("tiny_text") is again and list(again.splits) == ["train"]


def test_register_text_task_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tasks.register_text_task("missing_text", str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="needs a version"):
        tasks.register_text_task("tfds_no_version", "tfds:lm1b")
    with pytest.raises(UserError, match="validation_fraction"):
        tasks.register_text_task("bad_fraction", "tfds:lm1b:1.1.0", validation_fraction=1.5)
    with pytest.raises(UserError, match="may only hold"):
        tasks.register_text_task("bad name!", "tfds:lm1b:1.1.0")
    assert "missing_text" not in seqio.TaskRegistry.names()


def test_register_tfds_task_with_mock_data(cleanup):
    cleanup.append("lm1b_mock")
    task = tasks.register_text_task("lm1b_mock", "tfds:lm1b:1.1.0", text_key="text")
    assert sorted(task.splits) == ["train", "validation"]
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        src = task.source.get_dataset("train", shuffle=False)
        texts = [ex["text"].decode() for ex in src.as_numpy_iterator()]
        out = chunks("lm1b_mock", 24)
    assert len(texts) == 40
    assert out and all(c.shape == (24,) for c in out)
    vocab = get_vocabulary()
    decoded = [vocab.decode(d) for d in documents(out)]
    # mock text is random letters and spaces; SentencePiece folds repeated spaces
    assert decoded == [" ".join(t.split()) for t in texts[: len(decoded)]]
    assert len(decoded) >= 30
