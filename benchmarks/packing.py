"""Fine-tuning throughput packed against one example per row (``data.pack``), T5 small.

    JAX_PLATFORMS=cpu python benchmarks/packing.py [--steps 3] [--batch 4]

Examples are synthetic token ids whose lengths follow two published length distributions,
in SentencePiece tokens of the T5 text-to-text format (task prefix, EOS; ~1.3 pieces a word):

* ``sst2``: GLUE SST-2 train, 67,349 phrases and sentences from the Stanford Sentiment
  Treebank (Socher et al., 2013); its items average about 9-10 words with a long tail to ~52
  (most train items are sub-sentence phrases). Modelled as log-normal, median 8 words,
  sigma 0.75, clipped to [1, 56] words; + "sst2 sentence:" (5 pieces) + EOS. Targets
  ``positive``/``negative``: 2 pieces + EOS.
* ``boolq``: SuperGLUE BoolQ (Clark et al., 2019, section 3): questions average 8.9 tokens,
  passages 108 tokens. Modelled as passage log-normal with median 100 words, sigma 0.45,
  clipped to [20, 350], plus a question of 6-12 words; + "boolq passage: question:" (8
  pieces) + EOS, trimmed to the row. Targets ``True``/``False``: 1 piece + EOS.

Every configuration runs the real jitted train step (``train.make_train_step``) of T5 small
(``configs/t5_finetune.py:small``: d_model 512, 8 + 8 layers, dropout 0.1, Adafactor) on rows
of inputs 512 / targets 64 tokens (``same row``), and, as the natural unpacked baseline,
inputs 512 / targets 8. Prints one JSON line per configuration and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_steps  # noqa: E402

from t5x_like import config as config_lib  # noqa: E402
from t5x_like import train as train_lib  # noqa: E402
from t5x_like.experiment import build  # noqa: E402
from t5x_like.finetune import packing  # noqa: E402

PIECES_PER_WORD = 1.3
INPUTS = 512


def lengths(kind: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(inputs, targets) token counts of ``n`` examples (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if kind == "sst2":
        words = np.clip(np.round(rng.lognormal(np.log(8), 0.75, n)), 1, 56)
        inputs = np.ceil(words * PIECES_PER_WORD) + 5 + 1
        targets = np.full(n, 3)
    else:
        words = np.clip(np.round(rng.lognormal(np.log(100), 0.45, n)), 20, 350)
        words += rng.integers(6, 13, n)
        inputs = np.ceil(words * PIECES_PER_WORD) + 8 + 1
        targets = np.full(n, 2)
    return [(int(min(a, INPUTS)), int(b)) for a, b in zip(inputs, targets, strict=True)]


def example_stream(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed + 1)
    block = 0
    while True:
        for a, b in lengths(kind, 4096, seed + block):
            yield {"inputs": np.append(rng.integers(3, 32000, a - 1), 1).astype(np.int32),
                   "targets": np.append(rng.integers(3, 32000, b - 1), 1).astype(np.int32)}
        block += 1


def batches(kind: str, *, pack: bool, batch: int, targets: int):
    """(batch, examples in it) pairs, forever."""
    stream = example_stream(kind)
    lens = {"inputs": INPUTS, "targets": targets}
    if pack:
        rows = packing.packed_text_to_text(stream, lens)
    else:
        rows = (packing.pack_row([ex], lens) for ex in stream)
    while True:
        block = [next(rows) for _ in range(batch)]
        stacked = {k: np.stack([r[k] for r in block]) for k in block[0]}
        examples = int(sum(r["targets_segment_ids"].max() for r in block))
        if not pack:
            stacked = {k: stacked[k] for k in ("inputs", "targets")}
        yield stacked, examples


def row_statistics(kind: str, *, pack: bool, targets: int, n: int = 8192) -> tuple[float, float]:
    """(examples per row, real tokens / row tokens) over ``n`` examples: step time does not
    depend on the rows' content (fixed shapes), so throughput is examples per row x rows/s.
    First-fit-decreasing fills a window's first rows with its longest examples, so a few
    timed batches alone would under-count."""
    stream = example_stream(kind, seed=7)
    lens = {"inputs": INPUTS, "targets": targets}
    examples = [next(stream) for _ in range(n)]
    rows = (list(packing.packed_text_to_text(iter(examples), lens)) if pack
            else [packing.pack_row([ex], lens) for ex in examples])
    real = sum(int(np.sum(r["inputs_segment_ids"] > 0) + np.sum(r["targets_segment_ids"] > 0))
               for r in rows)
    return n / len(rows), real / (len(rows) * (INPUTS + targets))


def run(kind: str, *, pack: bool, batch: int, targets: int, steps: int) -> dict:
    c = config_lib.load_config("configs/t5_finetune.py:small", [
        f"data.batch_size={batch}", f"data.inputs_length={INPUTS}",
        f"finetune.targets_length={targets}", f"data.pack={pack}",
        "train.progress_bar=false"])
    exp = build(c)
    state = exp.init_state()
    step = train_lib.make_train_step(exp)
    source = batches(kind, pack=pack, batch=batch, targets=targets)
    counts, efficiency = [], []
    holder = {"state": state}

    def one_step():
        host, n = next(source)
        counts.append(n)
        seg_in = host.get("inputs_segment_ids", host["inputs"])
        seg_tg = host.get("targets_segment_ids", host["targets"])
        efficiency.append((np.sum(seg_in > 0) + np.sum(seg_tg > 0)) / (seg_in.size + seg_tg.size))
        placed = jax.device_put(host, exp.batch_sharding)
        holder["state"], metrics = step(holder["state"], placed)
        jax.block_until_ready(metrics["loss"])

    timing = time_steps(one_step, warmup=1, steps=steps, tokens_per_step=batch * INPUTS)
    per_row, row_efficiency = row_statistics(kind, pack=pack, targets=targets)
    per_step = batch * per_row
    return {"kind": kind, "pack": pack, "rows": f"{batch} x {INPUTS}/{targets}",
            "examples_per_step": per_step,
            "examples_per_s": per_step / (timing["step_ms_median"] / 1000),
            "step_ms_median": timing["step_ms_median"],
            "step_ms_min": timing["step_ms_min"], "step_ms_max": timing["step_ms_max"],
            "packing_efficiency": row_efficiency,
            "timed_batches_efficiency": float(np.mean(efficiency[-steps:])),
            "other_processes_cpu_share": timing["other_processes_cpu_share"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--kinds", default="sst2,boolq")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    env = environment()
    print(json.dumps({"environment": env}), flush=True)
    results = []
    for kind in args.kinds.split(","):
        for pack, targets in ((True, 64), (False, 64), (False, 8)):
            r = run(kind, pack=pack, batch=args.batch, targets=targets, steps=args.steps)
            print(json.dumps(r), flush=True)
            results.append(r)
    for kind in args.kinds.split(","):
        packed = next(r for r in results if r["kind"] == kind and r["pack"])
        for r in results:
            if r["kind"] == kind and not r["pack"]:
                print(f"{kind}: packed / unpacked {r['rows']}: "
                      f"{packed['examples_per_s'] / r['examples_per_s']:.2f}x examples/s; "
                      f"efficiency {packed['packing_efficiency']:.2f} vs "
                      f"{r['packing_efficiency']:.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
