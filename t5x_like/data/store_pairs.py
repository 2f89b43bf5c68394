"""Sentence-pair and FULL-SENTENCES rows from a prepared store, each a function of (seed, i).

The streaming builder (``sentence_pairs.py``) walks every document of an epoch in order, so
example i depends on all before it. Here the documents stay addressable in the store and
every example is built from its own generator, so a run resumes at batch k, on any number of
hosts, by arithmetic:

- Documents (``examples_per_document`` N, as in ``documents.py``): N > 0, document d is the
  task's source examples [d N, (d + 1) N), its segments; N = 0, document d is example d, its
  sentences (cut after ``sentence_ends``) its segments. Store positions come from the source
  index kept per record.
- Pairs (``nsp``, ``sop``): document d has ``ceil(tokens / max_tokens)`` slots, slot j starting
  at the segment that holds its token j * max_tokens, so an epoch covers every document about
  as BERT's walk does. Each epoch shuffles the slots (Grain's index shuffle); the example of
  slot s in epoch e draws from ``default_rng([seed, e, s])`` and follows the streaming
  builder's recipe: gather segments up to the target length (a random shorter one with
  ``short_seq_prob``), keeping at least two by reaching back when the slot starts on the
  document's last segment; cut at a random boundary; NSP: B from a random other document
  with p = 0.5; SOP: swapped with p = 0.5. A document of one segment (no boundary to cut at)
  gives NSP a forced random B, as BERT's reference does, and SOP a cut at a random token.
- FULL-SENTENCES: the task's examples in source order, cut into pieces of at most a row's
  capacity, are the segments; row c packs whole segments from the first segment boundary at
  or after token c x capacity, ``doc_sep`` between documents. Rows start at segment
  boundaries, so a segment is never split across rows (a row may leave the tail of its last
  segment to no row: at most one segment per row).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from functools import cached_property

import numpy as np

from t5x_like.data.sentence_pairs import (
    SpecialTokens,
    _encode_pairs,
    _random_segments,
    truncate_pair,
)
from t5x_like.data.store import StoreSplit
from t5x_like.data.store_input import read_ahead, rows_per_process
from t5x_like.errors import UserError


class StoreDocuments:
    """The documents of one store split, in source order, read on demand."""

    def __init__(self, store: StoreSplit, examples_per_document: int,
                 sentence_ends: Sequence[int], eos: int):
        self.store = store
        self.n = examples_per_document
        self.ends = tuple(sentence_ends)
        self.eos = eos

    @cached_property
    def _order(self) -> np.ndarray:
        return self.store.source_order  # store positions in source order

    @cached_property
    def example_tokens(self) -> np.ndarray:
        """Tokens of each source-order example without its EOS."""
        return np.maximum(self.store.index[self._order, 0] - 1, 0)

    @property
    def count(self) -> int:
        n = len(self._order)
        return -(-n // self.n) if self.n else n

    @cached_property
    def tokens(self) -> np.ndarray:
        """Tokens per document (without EOS)."""
        if not self.n:
            return self.example_tokens
        sums = np.add.reduceat(self.example_tokens, np.arange(0, len(self._order), self.n))
        return sums.astype(np.int64)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, d: int) -> list[np.ndarray]:
        """Document d's segments: the list-of-documents view the streaming helpers take."""
        return self.segments(d)

    def segments(self, d: int) -> list[np.ndarray]:
        """Document d's segments (non-empty)."""
        if self.n:
            positions = self._order[d * self.n:(d + 1) * self.n]
            texts = [self._strip(t) for t in self.store.documents(positions)]
            return [t for t in texts if t.size] or texts[:1]
        ids = self._strip(self.store.documents([self._order[d]])[0])
        cuts = np.flatnonzero(np.isin(ids, self.ends)) + 1
        return [s for s in np.split(ids, cuts) if s.size] or [ids]

    def _strip(self, ids: np.ndarray) -> np.ndarray:
        return ids[:-1] if ids.size and ids[-1] == self.eos else ids


def _gather(segments: list[np.ndarray], start_token: int, goal: int) -> list[np.ndarray]:
    """Segments from the one holding ``start_token`` until ``goal`` tokens, at least two
    where the document has two (reaching back from its end)."""
    ends = np.cumsum([len(s) for s in segments])
    first = min(int(np.searchsorted(ends, start_token, side="right")), len(segments) - 1)
    last, size = first, 0
    while last < len(segments):
        size += len(segments[last])
        last += 1
        if size >= goal and last - first >= 2:
            break
    if last - first < 2 and first > 0:
        first -= 1
    return segments[first:last]


def pair_example(docs: StoreDocuments, slot_doc: int, slot_in_doc: int, rng: np.random.Generator,
                 objective: str, max_tokens: int, short_seq_prob: float
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label) of one slot (module docstring)."""
    goal = int(rng.integers(2, max_tokens + 1)) if rng.random() < short_seq_prob else max_tokens
    segments = docs.segments(slot_doc)
    chunk = _gather(segments, slot_in_doc * max_tokens, goal)
    label = int(rng.random() < 0.5)
    if len(chunk) >= 2:
        a_end = int(rng.integers(1, len(chunk)))
        a, rest = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
    elif objective == "sop" and len(chunk[0]) >= 2:
        cut = int(rng.integers(1, len(chunk[0])))
        a, rest = chunk[0][:cut], chunk[0][cut:]
    else:
        a, rest, label = chunk[0], chunk[0][:0], 1
    if objective == "nsp" and label:
        b = _random_segments(docs, slot_doc, max(goal - len(a), 1), rng)  # type: ignore[arg-type]
    else:
        b = rest
        if label:  # sop: swapped
            a, b = b, a
    a, b = truncate_pair(a, b, max_tokens, rng)
    return a, b, label


class FullSentenceRows:
    """FULL-SENTENCES rows by index (module docstring)."""

    def __init__(self, docs: StoreDocuments, length: int, special: SpecialTokens):
        special.require("bos", "eos")
        self.docs, self.length, self.special = docs, length, special
        self.capacity = length - 2
        self.doc_sep = special.eos if special.doc_sep is None else special.doc_sep
        cap = self.capacity
        sizes = docs.example_tokens
        pieces = np.maximum(-(-sizes // cap), 1)  # pieces per example
        self.example_of_piece = np.repeat(np.arange(len(sizes)), pieces)
        first_piece = np.concatenate([[0], np.cumsum(pieces)[:-1]])
        self.piece_in_example = np.arange(len(self.example_of_piece)) - first_piece[
            self.example_of_piece]
        piece_sizes = np.minimum(sizes[self.example_of_piece] - self.piece_in_example * cap, cap)
        self.piece_starts = np.concatenate([[0], np.cumsum(piece_sizes)])
        self.count = int(self.piece_starts[-1] // cap)

    def row(self, c: int) -> np.ndarray:
        """Row c: whole segments from the first boundary at or after token c x capacity."""
        p = int(np.searchsorted(self.piece_starts, c * self.capacity, side="left"))
        chosen, used, last_doc = [], 0, None
        while p < len(self.example_of_piece):
            example = int(self.example_of_piece[p])
            size = int(self.piece_starts[p + 1] - self.piece_starts[p])
            doc = example // self.docs.n if self.docs.n else example
            sep = int(bool(chosen) and doc != last_doc)
            if used + sep + size > self.capacity:
                break
            chosen.append((p, example, sep, size))
            used, last_doc, p = used + sep + size, doc, p + 1
        examples = sorted({e for _, e, _, _ in chosen})
        texts = dict(zip(examples, map(self.docs._strip, self.docs.store.documents(
            self.docs._order[examples])), strict=True))
        parts = []
        for piece, example, sep, size in chosen:
            if sep:
                parts.append(np.array([self.doc_sep], np.int32))
            start = int(self.piece_in_example[piece]) * self.capacity
            parts.append(texts[example][start:start + size])
        return np.concatenate([[self.special.bos], *parts, [self.special.eos]]).astype(np.int32)


def store_pair_batches(
    store: StoreSplit,
    *,
    objective: str,
    length: int,
    global_batch: int,
    seed: int,
    special: SpecialTokens,
    examples_per_document: int,
    sentence_ends: Sequence[int],
    eos: int,
    short_seq_prob: float = 0.1,
    repeat: bool = True,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 4,
    prefetch_batches: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of global batches start_batch, ... of ``objective`` (``nsp``,
    ``sop``, ``full_sentences``), in the layout ``sentence_pairs.sentence_pair_batches``
    gives. ``repeat=False``: the first epoch's whole batches, slots in order."""
    import grain

    rows = rows_per_process(global_batch, process_count)
    docs = StoreDocuments(store, examples_per_document, sentence_ends, eos)
    if objective == "full_sentences":
        builder = FullSentenceRows(docs, length, special)
        size = builder.count
    else:
        special.require("cls", "sep")
        if objective == "nsp" and docs.count < 2:
            raise UserError(f"NSP needs at least two documents; store {store.path} has "
                            f"{docs.count}")
        max_tokens = length - 3
        slots = np.maximum(-(-docs.tokens // max_tokens), 1)
        slot_starts = np.concatenate([[0], np.cumsum(slots)])
        size = int(slot_starts[-1])
        label = "next_sentence_label" if objective == "nsp" else "sentence_order_label"
    if size < global_batch:
        raise UserError(f"store {store.path} yields {size} {objective} rows, fewer than one "
                        f"batch of {global_batch}; add text or lower data.batch_size")
    order = grain.MapDataset.range(size)
    if repeat:
        order = order.seed(seed).shuffle().repeat()
        num_batches = sys.maxsize // (2 * global_batch)
    else:
        num_batches = size // global_batch

    def example(i: int):
        slot = int(order[i])
        if objective == "full_sentences":
            return builder.row(slot)
        d = int(np.searchsorted(slot_starts, slot, side="right")) - 1
        rng = np.random.default_rng([seed, i // size, slot])
        return pair_example(docs, d, slot - int(slot_starts[d]), rng, objective, max_tokens,
                            short_seq_prob)

    def batch(k: int) -> dict[str, np.ndarray]:
        first = k * global_batch + process_index * rows
        items = [example(i) for i in range(first, first + rows)]
        if objective != "full_sentences":
            return _encode_pairs(items, length, special, label)
        ids = np.full((rows, length), special.pad, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for r, row in enumerate(items):
            ids[r, :len(row)], mask[r, :len(row)] = row, 1
        return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask}

    return read_ahead(batch, start_batch, num_batches, read_threads, prefetch_batches)
