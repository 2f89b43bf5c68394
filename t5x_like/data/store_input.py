"""Training input from prepared stores, with Grain: global batch k is a function of (seed, k).

The documents of a store split, concatenated in store order, are cut into chunks of
``raw_length`` tokens (chunk c = tokens [c L, (c + 1) L)). Global example i of a run is

- one task: chunk ``order[i]`` with ``order = range(C).shuffle(seed).repeat()`` (Grain's
  index shuffle, a new permutation every epoch, epochs following each other);
- a mixture: Grain's ``MapDataset.mix`` of the tasks' shuffled orders at seqio's rates
  (``tasks.mixtures.mixing_rates``), so which task example i comes from is a function of i;
- rows that continue their text (``consecutive_batches`` = T > 1, XLNet's memory): runs of
  T consecutive chunks are shuffled instead, and row r of batch k reads chunk t of run
  ``order[(k // T) B + r]``, t = k mod T.

Global batch k holds examples [k B, (k + 1) B); process p of P reads rows [p B/P, (p+1) B/P)
of it and nothing else. The checkpoint stores k, so resuming costs the same at any step and
gives the same global batches on any number of processes. Evaluation (``repeat=False``)
reads every task's chunks in order, once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np

from t5x_like.data.store import StoreSplit
from t5x_like.errors import UserError

_MAX_SEED = 2 ** 32


def _task_seed(seed: int, task: int) -> int:
    return (seed + 0x9E3779B1 * (task + 1)) % _MAX_SEED


class ChunkIndex:
    """Global example index -> (task, chunk) for one task or a mixture."""

    def __init__(self, chunk_counts: Sequence[int], rates: Sequence[float] | None, *,
                 seed: int, shuffle: bool, repeat: bool, run_length: int = 1):
        import grain

        self.counts = [int(c) for c in chunk_counts]
        self.run_length = run_length
        if repeat:
            units = [c // run_length for c in self.counts]
            orders = []
            for t, n in enumerate(units):
                order = grain.MapDataset.range(n)
                if shuffle:
                    order = order.seed(_task_seed(seed, t)).shuffle()
                orders.append(order.repeat().map(lambda c, t=t: (t, c)))
            self.order = orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, rates)
            self.length = None
        else:  # every chunk once, task after task
            self.starts = np.concatenate([[0], np.cumsum(self.counts)])
            self.length = int(self.starts[-1])

    def __call__(self, i: int) -> tuple[int, int]:
        if self.length is None:
            return self.order[i]
        t = int(np.searchsorted(self.starts, i, side="right")) - 1
        return t, i - int(self.starts[t])


def token_batches(
    stores: Sequence[StoreSplit],
    rates: Sequence[float] | None,
    *,
    raw_length: int,
    global_batch: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    consecutive_batches: int = 1,
    read_threads: int = 4,
    prefetch_batches: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """{"tokens": int32[global_batch / process_count, raw_length]}: this process's rows of
    global batches start_batch, start_batch + 1, ... (module docstring)."""

    rows = rows_per_process(global_batch, process_count)
    counts = [s.num_tokens // raw_length for s in stores]
    for store, count in zip(stores, counts, strict=True):
        if count < 1:
            raise UserError(f"store {store.path} holds {store.num_tokens} tokens, fewer than "
                            f"one example of {raw_length}; add text or shorten the sequences")
    run = consecutive_batches
    if run > 1 and len(stores) > 1:
        raise UserError("a mixture's examples interleave several tasks, so rows cannot "
                        "continue one text across batches; train this objective on a task")
    if run > 1 and not repeat:  # one block over the whole split: the longest rows it allows
        run = max(counts[0] // global_batch, 1)
    index = ChunkIndex(counts, rates, seed=seed, shuffle=shuffle, repeat=repeat,
                       run_length=run)
    if repeat:
        num_batches = sys.maxsize // (2 * global_batch * max(run, 1))
    else:
        num_batches = (counts[0] // run if run > 1 else index.length) // global_batch
        if num_batches < 1:
            raise UserError(f"split {stores[0].split!r} of the store at {stores[0].path.parent}"
                            f" holds fewer than one batch of {global_batch} x {raw_length} "
                            "tokens; add text, lower data.batch_size or the sequence length")

    def chunk_of(k: int, r: int) -> tuple[int, int]:
        if run == 1:
            return index(k * global_batch + r)
        if not repeat:
            return 0, r * run + k
        t, unit = index((k // run) * global_batch + r)
        return t, unit * run + k % run

    def batch(k: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch k, one read per store."""
        where = [chunk_of(k, process_index * rows + r) for r in range(rows)]
        tokens = np.zeros((rows, raw_length), np.int32)
        for t, store in enumerate(stores):
            mine = [r for r, (task, _) in enumerate(where) if task == t]
            if mine:
                starts = [where[r][1] * raw_length for r in mine]
                tokens[mine] = store.stream_slices(starts, raw_length)
        return {"tokens": tokens}

    return read_ahead(batch, start_batch, num_batches, read_threads, prefetch_batches)


def rows_per_process(global_batch: int, process_count: int) -> int:
    """Rows of each global batch one process reads (a UserError unless they divide evenly)."""
    if global_batch % process_count:
        raise UserError(f"data.batch_size={global_batch} cannot be split evenly over "
                        f"{process_count} processes; make it a multiple of {process_count}")
    return global_batch // process_count


def read_ahead(batch, start_batch: int, num_batches: int, read_threads: int,
               prefetch_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """``batch(k)`` for k in [start_batch, num_batches), built ahead on Grain's threads."""
    import grain

    if start_batch >= num_batches:
        return iter(())
    ds = grain.MapDataset.range(start_batch, num_batches).map(batch)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    return iter(ds.to_iter_dataset(options))
