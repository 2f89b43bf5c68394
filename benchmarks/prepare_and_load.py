"""Prepared token stores, measured: writing them, reading them, resuming from them.

    .venv/bin/python benchmarks/prepare_and_load.py [--task shakespeare] [--split train]

(a) ``prepare`` throughput (tokens/s per worker) with 1 and 2 local workers and on Beam's
    DirectRunner, next to tokenising the same task through seqio's tf.data path
    (``task.get_dataset(...)`` iterated to the end);
(b) loader throughput from the store (``store_input.token_batches``, tokens/s on this host,
    1 and 2 read threads) against what the `t5x-like bench` steps recorded in RESULTS.md
    consume;
(c) time to the first batch after a resume at batch n, from the store (n = 1e2, 1e4, 1e6)
    and by today's streaming replay (``pipeline.raw_token_batches(skip_batches=n)``, run at
    n = 0, 1e2, 1e3 and extrapolated linearly beyond).

Prints one JSON object. Every timing records how much of the machine's CPU other processes
took meanwhile (``others``: 0 = the machine was ours, 1 = every core busy with others).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("T5X_LIKE_CACHE", str(ROOT / ".cache" / "t5x_like"))

# Recorded step times (benchmarks/RESULTS.md, "`t5x-like bench`" timing run, 2026-11-23,
# remat none): batch 8, raw span-corruption chunks of 141 (tiny, inputs 128) and 568 (small,
# inputs 512) tokens.
STEPS = {"tiny": dict(step_s=0.1342, batch=8, raw_length=141),
         "small": dict(step_s=10.868, batch=8, raw_length=568)}


class Meter:
    """Wall time, and the share of all cores other processes used meanwhile."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.busy, self.ours = self._cpu()
        self.load = os.getloadavg()[0]
        return self

    @staticmethod
    def _cpu() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
        mine = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            mine += usage.ru_utime + usage.ru_stime
        return (sum(fields[:8]) - fields[3] - fields[4]) / ticks, mine

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        busy, ours = self._cpu()
        others = max((busy - self.busy) - (ours - self.ours), 0.0)
        self.others = others / (len(os.sched_getaffinity(0)) * self.seconds)
        return False

    def record(self, **extra) -> dict:
        return dict(seconds=round(self.seconds, 3), others=round(self.others, 2),
                    load1_before=round(self.load, 1), **extra)


# --------------------------------------------------------------------------- (a)


def bench_prepare(task_name: str, split: str, work: Path, workers: tuple[int, ...],
                  beam: bool, shards: int) -> dict:
    from t5x_like.prepare import prepare, source_examples, task_for_prepare

    task = task_for_prepare(task_name, split)  # TensorFlow, seqio and the vocabulary: once
    out: dict = {}
    with Meter() as m:
        tokens = 0
        ds = task.get_dataset({"targets": 568}, split=split, shuffle=False, num_epochs=1,
                              use_cached=False, seed=0)
        for ex in ds.as_numpy_iterator():
            tokens += len(ex["targets"])
    out["seqio_tf_data"] = m.record(tokens=tokens, tokens_per_s=round(tokens / m.seconds),
                                    workers=1)
    manifests = {}
    for n in workers:
        folder = work / f"local{n}"
        with Meter() as m:
            manifests[n] = prepare(task_name, split, str(folder), workers=n, num_shards=shards,
                                   progress=False)
        tokens = manifests[n]["tokens"]
        row = m.record(tokens=tokens, tokens_per_s=round(tokens / m.seconds),
                       tokens_per_s_per_worker=round(tokens / m.seconds / n), workers=n,
                       note="in this process" if n == 1 else
                       "wall time, including starting the worker processes")
        out[f"prepare_workers_{n}"] = row
        # each worker's map phase alone, one after the other in this warm process
        for w in range(n):
            with Meter() as mw:
                got = sum(len(t) for _, t in source_examples(task, split, w, n))
            out[f"map_worker_{w}_of_{n}"] = mw.record(
                tokens=got, tokens_per_s=round(got / mw.seconds),
                note="read + tokenise only, no process start, no writing")
    if beam:
        from t5x_like.prepare_beam import prepare_with_beam

        with Meter() as m:
            got = prepare_with_beam(task_name, split, str(work / "beam"), runner="DirectRunner",
                                    num_shards=shards, source_parts=2, progress=False)
        out["prepare_beam_direct"] = m.record(
            tokens=got["tokens"], tokens_per_s=round(got["tokens"] / m.seconds),
            identical_manifest=got == manifests[workers[0]],
            note="DirectRunner, 1 worker thread, source in 2 parts")
    return out


# --------------------------------------------------------------------------- (b)


def bench_loader(root: Path, task_name: str, split: str, batches: int) -> dict:
    from t5x_like.data.store import StoreSplit
    from t5x_like.data.store_input import token_batches

    store = StoreSplit(str(root), task_name, split)
    out: dict = {}
    for preset, step in STEPS.items():
        need = step["batch"] * step["raw_length"] / step["step_s"]
        for threads in (1, 2):
            it = token_batches([store], None, raw_length=step["raw_length"],
                               global_batch=step["batch"], seed=0, read_threads=threads)
            next(it)  # the first batch (Grain's threads starting) is part (c), not this
            with Meter() as m:
                tokens = 0
                for _ in range(batches):
                    tokens += next(it)["tokens"].size
            rate = tokens / m.seconds
            out[f"{preset}_threads_{threads}"] = m.record(
                batch=step["batch"], raw_length=step["raw_length"], batches=batches,
                tokens_per_s=round(rate), step_needs_tokens_per_s=round(need),
                times_step_consumption=round(rate / need, 1))
    return out


# --------------------------------------------------------------------------- (c)


def bench_resume(root: Path, task_name: str, split: str, batch: int, raw_length: int,
                 store_at: tuple[int, ...], stream_at: tuple[int, ...],
                 extrapolate_to: tuple[int, ...]) -> dict:
    from t5x_like.data.pipeline import raw_token_batches
    from t5x_like.data.store import StoreSplit
    from t5x_like.data.store_input import token_batches

    out: dict = {"batch": batch, "raw_length": raw_length, "store": {}, "stream": {}}
    for n in store_at:
        with Meter() as m:  # a fresh open (manifest, sizes, index) as a restarted run does
            store = StoreSplit(str(root), task_name, split)
            first = next(token_batches([store], None, raw_length=raw_length,
                                       global_batch=batch, seed=0, start_batch=n))
        out["store"][str(n)] = m.record(rows=len(first["tokens"]))
    measured = []
    for n in stream_at:
        with Meter() as m:
            it = raw_token_batches(task_name, split=split, raw_length=raw_length,
                                   batch_size=batch, seed=0, skip_batches=n)
            first = next(it)
        it.close()
        out["stream"][str(n)] = m.record(rows=len(first["tokens"]))
        measured.append((n, m.seconds))
    # least squares of seconds = a + b n over the measured points
    xs = [n for n, _ in measured]
    ys = [s for _, s in measured]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
         / sum((x - mx) ** 2 for x in xs))
    a = my - b * mx
    out["stream_fit"] = dict(fixed_s=round(a, 3), per_batch_ms=round(1e3 * b, 3))
    for n in extrapolate_to:
        out["stream"].setdefault(str(n), dict(seconds=round(a + b * n, 1), extrapolated=True))
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="shakespeare")
    parser.add_argument("--split", default="train")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="local worker counts to time")
    parser.add_argument("--no-beam", action="store_true")
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--stream-at", default="0,100,1000")
    parser.add_argument("--store-at", default="100,10000,1000000")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="t5x_like_store_bench_"))
    try:
        workers = tuple(int(w) for w in args.workers.split(","))
        result = dict(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
                    f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB",
            task=args.task, split=args.split, shards=args.shards, steps=STEPS)
        result["prepare"] = bench_prepare(args.task, args.split, work, workers,
                                          not args.no_beam, args.shards)
        root = work / f"local{workers[0]}"
        result["loader"] = bench_loader(root, args.task, args.split, args.loader_batches)
        result["resume"] = bench_resume(
            root, args.task, args.split, STEPS["small"]["batch"], STEPS["small"]["raw_length"],
            tuple(int(n) for n in args.store_at.split(",")),
            tuple(int(n) for n in args.stream_at.split(",")),
            (10_000, 1_000_000))
        result["finished"] = time.strftime("%H:%M UTC", time.gmtime())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
