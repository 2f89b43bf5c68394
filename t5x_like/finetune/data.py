"""Labelled-example batches from a seqio task or mixture with ``inputs``/``targets`` features.

One example per row, padded with 0 to fixed lengths; or, with ``pack=True``, several examples
per row (``finetune.packing``: ``*_segment_ids`` and ``*_positions``; encoder rows also list each
example's [CLS] position and its label in slots ``[M]``). Text-to-text families read
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
from t5x_like.finetune import packing


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
                         skip_batches: int = 0, shard_index: int = 0, num_shards: int = 1,
                         pack: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """``{"inputs": [B, inputs_length], "targets": [B, targets_length]}`` int32 (packed: with
    ``inputs_segment_ids``, ``inputs_positions``, ``targets_segment_ids``, ``targets_positions``).
    """
    lengths = {"inputs": inputs_length, "targets": targets_length}
    stream = examples(name, split=split, lengths=lengths, seed=seed, shuffle=shuffle,
                      repeat=repeat, shard_index=shard_index, num_shards=num_shards)
    if pack:
        rows = packing.packed_text_to_text(stream, lengths)
        return _batched(rows, batch_size, skip_batches, repeat, packing.pack_row([], lengths))
    rows = ({"inputs": _pad(ex["inputs"], inputs_length),
             "targets": _pad(ex["targets"], targets_length)} for ex in stream)
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

    def example(self, ex: dict) -> dict | None:
        """The unpadded row of one example: ``ids`` ([CLS] ... [SEP]) and its label
        (``label``; ``start``/``end`` from the example's first token; ``token_labels``
        [len(ids)]), or None (counted in ``skipped``) when the targets give no label."""
        body = _strip_eos(ex["inputs"], self.eos)[: self.length - 2 - self.prompt_length]
        ids = [self.cls] + [self.sep] * self.prompt_length + body + [self.sep]
        out: dict = {"ids": ids}
        target = _strip_eos(ex["targets"], self.eos)
        offset = 1 + self.prompt_length
        if self.head == "classification":
            label = self.labels.get(tuple(target))
            if label is None:
                self.skipped += 1
                return None
            out["label"] = np.asarray(label, np.int32)
        elif self.head == "regression":
            try:
                out["label"] = np.asarray(float(self.vocabulary.decode(target)), np.float32)
            except ValueError:
                self.skipped += 1
                return None
        elif self.head == "span_qa":
            start = find_span(body, target)
            if start < 0:
                self.skipped += 1
                return None
            out["start"] = np.asarray(offset + start, np.int32)
            out["end"] = np.asarray(offset + start + len(target) - 1, np.int32)
        else:  # token_classification
            if "token_labels" not in ex:
                raise UserError("finetune.head='token_classification' needs a task that keeps "
                                "a per-token 'token_labels' feature aligned with its inputs")
            labels = np.full(len(ids), -1, np.int32)
            given = np.asarray(ex["token_labels"], np.int32)[: len(body)]
            labels[offset: offset + len(given)] = given
            out["token_labels"] = labels
        return out

    def __call__(self, ex: dict) -> dict | None:
        """One example per row, padded to ``length``."""
        part = self.example(ex)
        return None if part is None else self.padded(part)

    def padded(self, part: dict) -> dict:
        """An ``example`` output alone in a row, padded to ``length``."""
        part = dict(part)
        ids = part.pop("ids")
        row = {"input_ids": _pad(ids, self.length),
               "attention_mask": _pad([1] * len(ids), self.length),
               "valid": np.ones((), np.float32)}
        if "token_labels" in part:
            labels = np.full(self.length, -1, np.int32)
            labels[: len(ids)] = part.pop("token_labels")
            row["token_labels"] = labels
        return {**row, **part}

    @property
    def max_segments(self) -> int:
        """Examples a packed row holds at most (its label slots ``M``)."""
        return max(1, self.length // 8)

    def packed(self, parts: Sequence[dict]) -> dict:
        """One packed row from ``example`` outputs: ``input_ids``, ``attention_mask``,
        ``segment_ids``, ``positions`` [L]; ``cls_positions``, ``valid`` and the labels in
        ``M`` slots (``start``/``end`` as row positions); ``token_labels`` [L]."""
        m = self.max_segments
        row = packing.pack_row([{"ids": p["ids"]} for p in parts], {"ids": self.length})
        out = {"input_ids": row["ids"], "attention_mask": (row["ids_segment_ids"] > 0)
               .astype(np.int32), "segment_ids": row["ids_segment_ids"],
               "positions": row["ids_positions"],
               "cls_positions": np.zeros(m, np.int32), "valid": np.zeros(m, np.float32)}
        if self.head == "token_classification":
            out["token_labels"] = np.full(self.length, -1, np.int32)
        elif self.head == "span_qa":
            out["start"], out["end"] = np.zeros(m, np.int32), np.zeros(m, np.int32)
        else:
            out["label"] = np.zeros(m, np.float32 if self.head == "regression" else np.int32)
        at = 0
        for slot, p in enumerate(parts):
            n = len(p["ids"])
            out["cls_positions"][slot], out["valid"][slot] = at, 1.0
            if self.head == "token_classification":
                out["token_labels"][at:at + n] = p["token_labels"]
            elif self.head == "span_qa":
                out["start"][slot], out["end"][slot] = at + p["start"], at + p["end"]
            else:
                out["label"][slot] = p["label"]
            at += n
        return out

    def packed_rows(self, parts: Iterator[dict]) -> Iterator[dict]:
        """First-fit-decreasing over windows of examples (``packing``)."""
        for block in packing.windows(parts):
            sizes = np.array([[len(p["ids"])] for p in block])
            for b in packing.first_fit_decreasing(sizes, [self.length],
                                                  max_segments=self.max_segments):
                yield self.packed([block[i] for i in b])


def encoder_batches(name: str, rows: EncoderRows, *, split: str, targets_length: int,
                    batch_size: int, seed: int, shuffle: bool, repeat: bool,
                    skip_batches: int = 0, shard_index: int = 0, num_shards: int = 1,
                    pack: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Encoder rows (``input_ids``, ``attention_mask``, ``valid`` and the head's labels;
    packed: see ``EncoderRows.packed``)."""
    lengths = {"inputs": rows.length, "targets": targets_length}
    stream = examples(name, split=split, lengths=lengths, seed=seed, shuffle=shuffle,
                      repeat=repeat, shard_index=shard_index, num_shards=num_shards)
    if pack:
        parts = _labelled(rows.example, stream, name, rows)
        return _batched(rows.packed_rows(parts), batch_size, skip_batches, repeat,
                        rows.packed([]))
    return _batched(_labelled(rows, stream, name, rows), batch_size, skip_batches, repeat,
                    rows.filler())


MAX_UNLABELLED_IN_A_ROW = 1000
_NO_LABEL = {
    "span_qa": "the answer's tokens do not occur in the first {length} input tokens",
    "classification": "the target is none of finetune.label_names",
    "regression": "the target is not a number",
}


def _labelled(convert, stream: Iterator[dict], name: str, rows: EncoderRows) -> Iterator[dict]:
    """``convert``'s rows, skipping examples without a label; many in a row stop the run.

    A repeated stream in which no example has a label would otherwise be read forever
    without yielding a batch (a hang, not an error).
    """
    in_a_row = 0
    for ex in stream:
        row = convert(ex)
        if row is not None:
            in_a_row = 0
            yield row
            continue
        in_a_row += 1
        if in_a_row >= MAX_UNLABELLED_IN_A_ROW:
            why = _NO_LABEL.get(rows.head, "there is no label").format(length=rows.length)
            raise UserError(
                f"{in_a_row} examples in a row of task {name!r} were skipped for "
                f"finetune.head={rows.head!r}: {why}; check the task, the head and "
                f"data.inputs_length"
            )
