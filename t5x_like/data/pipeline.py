"""Host batches of raw token chunks: deterministic, resumable, sharded across hosts.

The stream for (task, split, raw_length, seed, shard) is a fixed sequence of chunks: seqio
shuffles documents per epoch (in-memory sources) or files (TFDS) with the seed, repeats,
tokenises, concatenates, splits into chunks and shuffles chunks in a seeded buffer. Batch k
is chunks [k*B, (k+1)*B) of that sequence, so resuming after n batches is
``skip_batches=n``: the trainer stores how many batches it consumed, nothing else. Skipping
replays the stream on the host (tokenising as it goes), which costs time proportional to n
but is exact.

Continuing rows (``consecutive_batches`` = T > 1, for XLNet's memory): chunks keep stream
order (documents or files are still shuffled per epoch, chunks are not), and each block of
B x T consecutive chunks is dealt so that row i of the next T batches holds chunks
i*T .. i*T + T - 1: every row continues its own text from one batch to the next, as
Transformer-XL's batchify lays out a corpus. A finite split (``repeat=False``) is one block,
as long as the split allows.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import numpy as np
import seqio

from t5x_like.data.registry import pretraining_provider, task_provider  # noqa: F401
from t5x_like.errors import UserError

# Per task object (a re-registered name is a new object): the probes that passed.
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_one_batch(task: seqio.Task, split: str, raw_length: int, batch_size: int,
                     shard_info: seqio.ShardInfo | None) -> None:
    """UserError unless one pass over ``task``'s shard of ``split`` fills one batch."""
    key = (split, raw_length, batch_size, shard_info)
    if key in _probed.get(task, ()):
        return
    ds = task.get_dataset({"targets": raw_length}, split=split, shuffle=False,
                          shard_info=shard_info, num_epochs=1, try_in_mem_cache=False)
    with _read_errors(task.name, split):
        chunks = sum(1 for _ in ds.take(batch_size))
    if chunks < batch_size:
        where = f" (shard {shard_info.index} of {shard_info.num_shards})" if shard_info else ""
        raise UserError(
            f"split {split!r} of task {task.name!r}{where} holds {chunks} chunk(s) of "
            f"{raw_length} tokens, fewer tokens than one batch of {batch_size} x {raw_length}; "
            "add text, lower data.batch_size or the sequence length, or use another split")
    _probed.setdefault(task, set()).add(key)


def raw_token_batches(
    name: str,
    *,
    split: str,
    raw_length: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    skip_batches: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    vocabulary: seqio.Vocabulary | None = None,
    consecutive_batches: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields {"tokens": int32[batch_size, raw_length]} from task or mixture ``name``.

    The same arguments give the same batches in any process; ``skip_batches=n`` starts at
    what would have been batch n; host ``shard_index`` of ``num_shards`` reads only its
    shard of the documents. ``vocabulary``, when given, must be the one the task tokenises
    with (a guard against training on ids from another vocabulary). Mistakes (unknown
    name or split, a split smaller than one batch) raise UserError at the call.
    ``consecutive_batches`` > 1 makes rows continue across batches (module docstring).
    """
    provider = pretraining_provider(name, split, vocabulary)
    if not 0 <= shard_index < num_shards:
        raise UserError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
    if raw_length < 1 or batch_size < 1 or skip_batches < 0 or consecutive_batches < 1:
        raise UserError(f"raw_length={raw_length}, batch_size={batch_size} and "
                        f"consecutive_batches={consecutive_batches} must be positive and "
                        f"skip_batches={skip_batches} not negative")
    continuing = consecutive_batches > 1
    if continuing and isinstance(provider, seqio.Mixture):
        raise UserError(f"{name!r} is a mixture, whose examples interleave several tasks, so "
                        "rows cannot continue one text across batches; train this objective "
                        "on a task, or turn its memory off")
    shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for task in tasks:
        if split in task.splits:
            _check_one_batch(task, split, raw_length, batch_size, shard_info)

    ds = provider.get_dataset(
        {"targets": raw_length},
        split=split,
        shuffle=shuffle,
        seed=seed,
        shard_info=shard_info,
        num_epochs=None if repeat else 1,
        try_in_mem_cache=False,
        # a buffer of one keeps chunk order; documents are still shuffled by the source
        **({"shuffle_buffer_size": 1} if continuing else {}),
    )
    ds = ds.map(lambda ex: ex["targets"])
    if continuing:
        with _read_errors(name, split):
            ds = _continuing_rows(ds, batch_size, raw_length, consecutive_batches, repeat)
    ds = ds.skip(skip_batches * batch_size).batch(batch_size, drop_remainder=True).prefetch(2)
    return _numpy_batches(ds, name, split)


def _continuing_rows(ds, rows: int, length: int, segments: int, repeat: bool):
    """Chunks in stream order -> chunks in the order that makes row i continue its text."""
    import tensorflow as tf

    if not repeat:  # one block over the whole finite split: the longest rows it allows
        count = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        segments = max(count // rows, 1)

    def deal(block):
        by_row = tf.reshape(block, [rows, segments, length])
        return tf.reshape(tf.transpose(by_row, [1, 0, 2]), [segments * rows, length])

    return ds.batch(rows * segments, drop_remainder=True).map(deal).unbatch()


def _numpy_batches(ds, name: str, split: str) -> Iterator[dict[str, np.ndarray]]:
    with _read_errors(name, split):
        for tokens in ds.as_numpy_iterator():
            yield {"tokens": tokens.astype(np.int32, copy=False)}


@contextlib.contextmanager
def _read_errors(name: str, split: str):
    """A data file that vanished or is damaged (a missing or truncated shard) mid-stream:
    one sentence naming the task and TensorFlow's own first line, not a TF traceback."""
    import tensorflow as tf

    # Bound before the yield: a generator closed at interpreter exit resumes here after
    # TensorFlow's modules are torn down, when ``tf.errors`` can no longer be looked up.
    data_errors = (tf.errors.NotFoundError, tf.errors.DataLossError,
                   tf.errors.PermissionDeniedError, tf.errors.InvalidArgumentError)
    try:
        yield
    except data_errors as e:
        first = (e.message or type(e).__name__).strip().splitlines()[0][:300]
        raise UserError(
            f"reading split {split!r} of task {name!r} failed: {type(e).__name__}: {first}; a "
            "data file is missing, truncated or damaged: restore it or remove it from the task"
        ) from None
