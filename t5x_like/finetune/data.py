"""Labelled-example batches from a seqio task or mixture with ``inputs``/``targets`` features.

One example per row (no packing), padded with 0 to fixed lengths. Text-to-text families read
``{"inputs", "targets"}``; encoder heads read ``[CLS] inputs [SEP]`` and a label taken from
the targets: the index of the label word (classification), the number it spells
(regression), the position of the answer tokens inside the inputs (span QA: the first
occurrence; examples whose answer is not found as tokens are skipped), or a per-token
``token_labels`` feature kept by the task (token classification).

Streams are deterministic per (task, split, seed, shard); resuming after n batches replays n
batches. A finite pass (``repeat=False``) ends with a padded partial batch whose padding rows
have weight 0, so evaluation scores every example once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import seqio

from t5x_like.data.pipeline import task_provider
from t5x_like.errors import UserError


def examples(name: str, *, split: str, lengths: dict[str, int], seed: int, shuffle: bool,
             repeat: bool, shard_index: int = 0, num_shards: int = 1) -> Iterator[dict]:
    """Numpy examples of task or mixture ``name`` with ``inputs``/``targets`` token ids
    (truncated to ``lengths``, EOS kept)."""
    provider = task_provider(name, split, "inputs", "a fine-tuning task; register one with "
                             "t5x_like.tasks.register_t2t_task")
    shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
    ds = provider.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed, shard_info=shard,
                              num_epochs=None if repeat else 1, try_in_mem_cache=False)
    yield from ds.as_numpy_iterator()


def _pad(ids: Sequence[int], length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    ids = np.asarray(ids, np.int32)[:length]
    out[: len(ids)] = ids
    return out


def _batched(rows: Iterator[dict], batch_size: int, skip_batches: int, repeat: bool,
             filler: dict) -> Iterator[dict[str, np.ndarray]]:
    """Stacks rows into batches; the last partial batch of a finite pass is padded with
    ``filler`` rows (weight 0, but one real token each so no attention row is empty)."""
    buffer: list[dict] = []
    index = 0
    for row in rows:
        buffer.append(row)
        if len(buffer) == batch_size:
            if index >= skip_batches:
                yield {k: np.stack([r[k] for r in buffer]) for k in buffer[0]}
            buffer, index = [], index + 1
    if buffer and not repeat and index >= skip_batches:
        buffer += [filler] * (batch_size - len(buffer))
        yield {k: np.stack([r[k] for r in buffer]) for k in buffer[0]}


def text_to_text_batches(name: str, *, split: str, inputs_length: int, targets_length: int,
                         batch_size: int, seed: int, shuffle: bool, repeat: bool,
                         skip_batches: int = 0, shard_index: int = 0, num_shards: int = 1
                         ) -> Iterator[dict[str, np.ndarray]]:
    """``{"inputs": [B, inputs_length], "targets": [B, targets_length]}`` int32."""
    lengths = {"inputs": inputs_length, "targets": targets_length}
    rows = ({"inputs": _pad(ex["inputs"], inputs_length),
             "targets": _pad(ex["targets"], targets_length)}
            for ex in examples(name, split=split, lengths=lengths, seed=seed, shuffle=shuffle,
                               repeat=repeat, shard_index=shard_index, num_shards=num_shards))
    filler = {"inputs": _pad([1], inputs_length), "targets": _pad([], targets_length)}
    return _batched(rows, batch_size, skip_batches, repeat, filler)


def _strip_eos(ids: np.ndarray, eos: int) -> list[int]:
    ids = [int(t) for t in ids if t != 0]
    return ids[:-1] if ids and ids[-1] == eos else ids


def find_span(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """First index where ``needle`` occurs in ``haystack`` as a contiguous run, else -1."""
    n = len(needle)
    if n == 0:
        return -1
    for i in range(len(haystack) - n + 1):
        if list(haystack[i:i + n]) == list(needle):
            return i
    return -1


class EncoderRows:
    """Turns a text-to-text example into an encoder row for one head (see module docstring)."""

    def __init__(self, *, head: str, length: int, cls: int, sep: int, eos: int, vocabulary,
                 label_names: Sequence[str], prompt_length: int = 0):
        self.head, self.length, self.cls, self.sep, self.eos = head, length, cls, sep, eos
        self.vocabulary = vocabulary
        self.labels = {tuple(vocabulary.encode(n)): i for i, n in enumerate(label_names)}
        self.prompt_length = prompt_length  # placeholders after [CLS] (prompt tuning)
        self.skipped = 0

    def filler(self) -> dict:
        """A padding row: [CLS] [SEP], weight 0, label 0 (ignored for token labels)."""
        row = {"input_ids": _pad([self.cls, self.sep], self.length),
               "attention_mask": _pad([1, 1], self.length), "valid": np.zeros((), np.float32)}
        if self.head == "token_classification":
            row["token_labels"] = np.full(self.length, -1, np.int32)
        elif self.head == "span_qa":
            row["start"] = row["end"] = np.zeros((), np.int32)
        else:
            dtype = np.float32 if self.head == "regression" else np.int32
            row["label"] = np.zeros((), dtype)
        return row

    def __call__(self, ex: dict) -> dict | None:
        body = _strip_eos(ex["inputs"], self.eos)[: self.length - 2 - self.prompt_length]
        ids = [self.cls] + [self.sep] * self.prompt_length + body + [self.sep]
        row = {"input_ids": _pad(ids, self.length), "attention_mask": _pad([1] * len(ids),
                                                                         self.length),
               "valid": np.ones((), np.float32)}
        target = _strip_eos(ex["targets"], self.eos)
        offset = 1 + self.prompt_length
        if self.head == "classification":
            label = self.labels.get(tuple(target))
            if label is None:
                self.skipped += 1
                return None
            row["label"] = np.asarray(label, np.int32)
        elif self.head == "regression":
            try:
                row["label"] = np.asarray(float(self.vocabulary.decode(target)), np.float32)
            except ValueError:
                self.skipped += 1
                return None
        elif self.head == "span_qa":
            start = find_span(body, target)
            if start < 0:
                self.skipped += 1
                return None
            row["start"] = np.asarray(offset + start, np.int32)
            row["end"] = np.asarray(offset + start + len(target) - 1, np.int32)
        else:  # token_classification
            if "token_labels" not in ex:
                raise UserError("finetune.head='token_classification' needs a task that keeps "
                                "a per-token 'token_labels' feature aligned with its inputs")
            labels = np.full(self.length, -1, np.int32)
            given = np.asarray(ex["token_labels"], np.int32)[: len(body)]
            labels[offset: offset + len(given)] = given
            row["token_labels"] = labels
        return row


def encoder_batches(name: str, rows: EncoderRows, *, split: str, targets_length: int,
                    batch_size: int, seed: int, shuffle: bool, repeat: bool,
                    skip_batches: int = 0, shard_index: int = 0, num_shards: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Encoder rows (``input_ids``, ``attention_mask``, ``valid`` and the head's labels)."""
    lengths = {"inputs": rows.length, "targets": targets_length}
    converted = (rows(ex) for ex in examples(name, split=split, lengths=lengths, seed=seed,
                                             shuffle=shuffle, repeat=repeat,
                                             shard_index=shard_index, num_shards=num_shards))
    return _batched((r for r in converted if r is not None), batch_size, skip_batches, repeat,
                    rows.filler())
