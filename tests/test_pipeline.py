"""Host batches: deterministic, resumable with skip_batches, sharded, with clear errors."""

import hashlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("T5X_LIKE_CACHE", str(ROOT / ".cache/t5x_like"))

import seqio  # noqa: E402

from t5x_like import tasks  # noqa: E402
from t5x_like.data.pipeline import raw_token_batches  # noqa: E402
from t5x_like.data.sources import InMemoryTextSource  # noqa: E402
from t5x_like.data.vocab import get_vocabulary  # noqa: E402
from t5x_like.errors import UserError  # noqa: E402

LINES = [f"Line {i}: the {['red', 'blue', 'green'][i % 3]} fox number {i} ran." for i in range(400)]


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline_corpus")
    (folder / "all.txt").write_text("\n".join(LINES) + "\n")
    tasks.register_text_task("pipeline_text", str(folder), validation_fraction=0.05)
    yield "pipeline_text"
    seqio.TaskRegistry.remove("pipeline_text")


def take(n, **kwargs):
    args = dict(split="train", raw_length=16, batch_size=4, seed=7) | kwargs
    return [b["tokens"] for b in itertools.islice(raw_token_batches(**args), n)]


def test_batches_have_the_promised_shape(text_task):
    (batch,) = take(1, name=text_task)
    assert batch.shape == (4, 16) and batch.dtype == np.int32


def test_same_seed_same_batches_other_seed_other_batches(text_task):
    first, again = take(12, name=text_task), take(12, name=text_task)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = take(12, name=text_task, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    unshuffled = take(12, name=text_task, shuffle=False)
    assert not all(np.array_equal(a, b) for a, b in zip(first, unshuffled, strict=True))


def test_documents_are_reshuffled_every_epoch_the_same_way():
    source = InMemoryTextSource({"train": LINES})

    def two_epochs(seed):
        ds = source.get_dataset("train", shuffle=True, seed=seed).repeat(2)
        texts = [ex["text"].decode() for ex in ds.as_numpy_iterator()]
        return texts[: len(LINES)], texts[len(LINES) :]

    first, second = two_epochs(5)
    assert sorted(first) == sorted(second) == sorted(LINES)  # each epoch is a permutation
    assert first != second and first != LINES  # ... and a new one every epoch
    assert two_epochs(5) == (first, second)  # ... the same ones for the same seed
    assert two_epochs(6)[0] != first
    unshuffled = [ex["text"].decode() for ex in source.get_dataset("train", shuffle=False)
                  .as_numpy_iterator()]
    assert unshuffled == LINES


def test_skip_batches_resumes_exactly(text_task):
    full = take(9, name=text_task)
    resumed = take(4, name=text_task, skip_batches=5)
    assert all(np.array_equal(a, b) for a, b in zip(full[5:], resumed, strict=True))
    mixture_full = take(6, name=tasks.DEFAULT_TASK)
    mixture_resumed = take(3, name=tasks.DEFAULT_TASK, skip_batches=3)
    assert all(np.array_equal(a, b) for a, b in zip(mixture_full[3:], mixture_resumed,
                                                        strict=True))


def docs_of(batches):
    stream = np.concatenate([b.reshape(-1) for b in batches]).tolist()
    vocab, docs, start = get_vocabulary(), [], 0
    for i, t in enumerate(stream):
        if t == 1:
            docs.append(vocab.decode(stream[start:i]))
            start = i + 1
    return docs


def test_two_shards_are_disjoint_and_cover_the_split(text_task):
    args = dict(name=text_task, split="train", raw_length=16, batch_size=2, seed=3,
                shuffle=False, repeat=False, num_shards=2)
    shards = [docs_of([b["tokens"] for b in raw_token_batches(shard_index=i, **args)])
              for i in range(2)]
    everything = set(docs_of([b["tokens"] for b in raw_token_batches(
        **(args | {"num_shards": 1}))]))
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) <= everything
    # each shard loses at most the documents of its last, incomplete batch
    assert len(shards[0]) + len(shards[1]) >= len(everything) - 6
    assert abs(len(shards[0]) - len(shards[1])) < 5


def test_mixture_batches_are_deterministic(text_task):
    tasks.register_mixture("pipeline_mix", [text_task, tasks.DEFAULT_TASK], temperature=4.0)
    try:
        first, again = take(6, name="pipeline_mix"), take(6, name="pipeline_mix")
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        both = set(np.concatenate(first).ravel().tolist())
        assert both & set(get_vocabulary().encode("fox number")) and len(both) > 60
    finally:
        seqio.MixtureRegistry.remove("pipeline_mix")


def test_user_errors(text_task, tmp_path):
    with pytest.raises(UserError, match="did you mean shakespeare"):
        raw_token_batches("shakespear", split="train", raw_length=16, batch_size=4, seed=0)
    with pytest.raises(UserError, match="no split 'test'"):
        raw_token_batches(text_task, split="test", raw_length=16, batch_size=4, seed=0)
    with pytest.raises(UserError, match="fewer tokens than one batch"):
        raw_token_batches(text_task, split="validation", raw_length=512, batch_size=64, seed=0)
    other = seqio.PassThroughVocabulary(size=5)
    with pytest.raises(UserError, match="not the model's vocabulary"):
        raw_token_batches(text_task, split="train", raw_length=16, batch_size=4, seed=0,
                          vocabulary=other)
    # the matching vocabulary passes the guard
    assert next(raw_token_batches(text_task, split="train", raw_length=16, batch_size=4, seed=0,
                                  vocabulary=get_vocabulary()))["tokens"].shape == (4, 16)


def test_same_batches_in_another_process():
    script = (
        "import hashlib, itertools;"
        "import t5x_like.tasks;"
        "from t5x_like.data.pipeline import raw_token_batches;"
        "b = [x['tokens'] for x in itertools.islice(raw_token_batches('shakespeare', "
        "split='train', raw_length=32, batch_size=4, seed=11, skip_batches=2), 3)];"
        "print(hashlib.sha256(b''.join(x.tobytes() for x in b)).hexdigest())"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    here = take(3, name=tasks.DEFAULT_TASK, raw_length=32, seed=11, skip_batches=2)
    digest = hashlib.sha256(b"".join(x.tobytes() for x in here)).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == digest


@pytest.mark.parametrize("shuffle", [False, True])
def test_continuing_rows_deal_the_stream_in_blocks(text_task, shuffle):
    """With consecutive_batches=T, batch t of block k holds, in row i, chunk k*B*T + i*T + t
    of the stream: the stream of a single row, which is the chunks in order (documents
    shuffled, chunks not)."""
    rows, segments = 4, 3
    stream = np.concatenate(take(2 * rows * segments, name=text_task, batch_size=1,
                                 consecutive_batches=2, shuffle=shuffle))
    dealt = take(2 * segments, name=text_task, batch_size=rows, consecutive_batches=segments,
                 shuffle=shuffle)
    for t, batch in enumerate(dealt):
        block, step = divmod(t, segments)
        for i in range(rows):
            np.testing.assert_array_equal(batch[i], stream[block * rows * segments
                                                           + i * segments + step])
    resumed = take(2, name=text_task, batch_size=rows, consecutive_batches=segments,
                   shuffle=shuffle, skip_batches=2)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(dealt[2:4]))
    if shuffle:  # the documents are shuffled: not the unshuffled stream
        plain = np.concatenate(take(rows * segments, name=text_task, batch_size=1,
                                    consecutive_batches=2, shuffle=False))
        assert not np.array_equal(plain, stream[:len(plain)])
    else:  # and the single-row stream is the plain one, chunk for chunk
        plain = np.concatenate(take(2 * rows * segments, name=text_task, batch_size=1,
                                    shuffle=False))
        np.testing.assert_array_equal(plain, stream)


def test_a_finite_split_is_one_block_of_the_longest_rows(text_task):
    """repeat=False: row i holds chunks i*T .. i*T+T-1 with T = chunks // rows."""
    args = dict(name=text_task, split="validation", shuffle=False, repeat=False)
    chunks = np.concatenate(take(10**6, batch_size=1, **args))
    rows = 2
    segments = len(chunks) // rows
    dealt = take(10**6, batch_size=rows, consecutive_batches=5, **args)
    assert len(dealt) == segments >= 2
    for t, batch in enumerate(dealt):
        np.testing.assert_array_equal(batch, chunks[[t, segments + t]])


def test_continuing_rows_refuse_a_mixture(text_task):
    tasks.register_mixture("pipeline_rows_mix", [text_task, tasks.DEFAULT_TASK], temperature=1.0)
    try:
        with pytest.raises(UserError, match="is a mixture"):
            take(1, name="pipeline_rows_mix", consecutive_batches=2)
    finally:
        seqio.MixtureRegistry.remove("pipeline_rows_mix")
