"""Packing: several short examples in one fixed-length row, as seqio's ``pack=True``.

Fields follow seqio's ``trim_and_pack_dataset`` (what ``EncDecFeatureConverter(pack=True)``
consumes): for each packed feature ``f``, ``f_segment_ids`` numbers the row's examples 1, 2,
... (0 is padding) and ``f_positions`` counts each example's tokens from 0. Where seqio packs
greedily in stream order, rows here are filled first-fit-decreasing over a window of examples
(longest first, each into the first row where every feature still fits), so short examples
fill the gaps the long ones leave. The window is read in stream order, so rows are a pure
function of the example stream: deterministic given the seed, and resumable by replay.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

WINDOW = 512  # examples packed together; more fills rows better, fewer keeps host memory small


def first_fit_decreasing(lengths: np.ndarray, capacity: Sequence[int], *,
                         max_segments: int | None = None) -> list[list[int]]:
    """Bins of example indices: ``lengths`` [N, F] (tokens per feature), ``capacity`` [F].

    Examples are taken longest first (by their largest fraction of a row; ties in stream
    order) and each goes into the first open bin where all F features fit and which holds
    fewer than ``max_segments`` examples; bins list their examples in stream order, and come
    in the order of their first example, so rows follow the (shuffled) stream instead of
    opening every window with its longest examples.
    """
    lengths = np.asarray(lengths, np.int64).reshape(len(lengths), -1)
    cap = np.asarray(capacity, np.int64)
    if np.any(lengths > cap):
        raise ValueError(f"an example of lengths {lengths.max(0).tolist()} exceeds the row "
                         f"{cap.tolist()}: trim before packing")
    size = (lengths / cap).max(axis=1)
    order = sorted(range(len(lengths)), key=lambda i: (-size[i], i))
    free = np.empty((0, len(cap)), np.int64)
    count = np.empty(0, np.int64)
    bins: list[list[int]] = []
    for i in order:
        fits = np.all(free >= lengths[i], axis=1)
        if max_segments is not None:
            fits &= count < max_segments
        hit = np.flatnonzero(fits)
        if hit.size:
            b = int(hit[0])
        else:
            b = len(bins)
            bins.append([])
            free = np.vstack([free, cap[None]])
            count = np.append(count, 0)
        bins[b].append(i)
        free[b] -= lengths[i]
        count[b] += 1
    return sorted(sorted(b) for b in bins)


def pack_row(examples: Sequence[dict[str, np.ndarray]], lengths: dict[str, int]
             ) -> dict[str, np.ndarray]:
    """One row from unpadded examples: each feature of ``lengths`` concatenated and
    zero-padded, with its ``_segment_ids`` and ``_positions``."""
    row = {}
    for name, length in lengths.items():
        tokens = np.zeros(length, np.int32)
        segments = np.zeros(length, np.int32)
        positions = np.zeros(length, np.int32)
        at = 0
        for s, ex in enumerate(examples, start=1):
            ids = np.asarray(ex[name], np.int32)
            n = len(ids)
            tokens[at:at + n] = ids
            segments[at:at + n] = s
            positions[at:at + n] = np.arange(n)
            at += n
        row[name] = tokens
        row[f"{name}_segment_ids"] = segments
        row[f"{name}_positions"] = positions
    return row


def windows(items: Iterator, size: int = WINDOW) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    block: list = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def packed_text_to_text(examples: Iterator[dict], lengths: dict[str, int], *,
                        window: int = WINDOW) -> Iterator[dict[str, np.ndarray]]:
    """Packed ``inputs``/``targets`` rows from examples already trimmed to ``lengths``."""
    names = list(lengths)
    for block in windows(examples, window):
        sizes = np.array([[len(ex[n]) for n in names] for ex in block])
        for b in first_fit_decreasing(sizes, [lengths[n] for n in names]):
            yield pack_row([block[i] for i in b], lengths)


def pack_examples(examples: Sequence[dict], lengths: dict[str, int], *, window: int = WINDOW
                  ) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, int]]]:
    """(packed rows, (row, slot) of each example): the rows ``packed_text_to_text`` gives for
    a finite list, and where each example went, so per-slot outputs (``score_batch`` on
    packed rows gives [B, M]) map back to the examples in order."""
    rows: list[dict[str, np.ndarray]] = []
    where: list[tuple[int, int]] = [(-1, -1)] * len(examples)
    names = list(lengths)
    for start in range(0, len(examples), window):
        block = examples[start:start + window]
        sizes = np.array([[len(ex[n]) for n in names] for ex in block])
        for b in first_fit_decreasing(sizes, [lengths[n] for n in names]):
            for slot, i in enumerate(b):
                where[start + i] = (len(rows), slot)
            rows.append(pack_row([block[i] for i in b], lengths))
    return rows, where
