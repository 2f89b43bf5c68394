"""What scanning the layer stack costs: our T5 bench step unrolled against scanned, in one process.

    .venv/bin/python benchmarks/scan_overhead.py                 # unrolled vs scanned + dots
    .venv/bin/python benchmarks/scan_overhead.py --variant keep_all=model.scan_layers=True
    .venv/bin/python benchmarks/scan_overhead.py --bench bert --variant scanned= \
        --variant unrolled=model.scan_layers=False      # bert_peers.py's BERT mini instead

``t5_peers.py``'s ``ours_scanned`` row runs in its own process, so its ratio to ``ours`` also
carries the process-to-process drift of this VM (a few percent). Here every variant is compiled
once in the same process and the variants' calls are interleaved (A B C, A B C, ...) for
``--rounds`` rounds; each round's time is one compiled call of ``train.steps_per_call`` steps,
and each variant's ratio to the first is the median of the per-round ratios with their min and
max. Same config, batch and synthetic data as ``t5_peers.py`` (the ``small`` preset's layout,
10 steps a call), and the same huge pages as the ``t5x-like`` command (``host_memory.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bert_peers
import t5_peers
from common import ROOT, wait_for_quiet

# Before JAX loads: importing t5x_like picks the CPU backend (t5x_like/platforms.py).
from t5x_like import host_memory

DEFAULT_VARIANTS = {
    "unrolled": [],
    "scanned_dots": ["model.scan_layers=True", "model.remat_policy=dots"],
}


def _t5(overrides: list[str]):
    config = str(ROOT / "configs/t5_span_corruption.py:small"), t5_peers.our_overrides(overrides)
    tokens = t5_peers.synthetic_batch((t5_peers.BATCH, t5_peers.RAW_LENGTH), salt=1)
    return config, {"tokens": tokens}


def _bert(overrides: list[str]):
    config = str(ROOT / "configs/bert_mlm_nsp.py:mini"), bert_peers.our_overrides(overrides)
    return config, bert_peers.our_batch()


# Each bench's (config file, overrides) and host batch, as its peers script times ours.
BENCHES = {"t5": _t5, "bert": _bert}


def build_call(overrides: list[str], bench: str = "t5"):
    """(a function running one compiled call and returning its seconds, steps per call, XLA
    temporary bytes) for the bench config with ``overrides``."""
    import jax

    from t5x_like import config as config_lib
    from t5x_like.bench import compile_trainer_call
    from t5x_like.experiment import build

    (config_file, all_overrides), host_batch = BENCHES[bench](overrides)
    exp = build(config_lib.load_config(config_file, all_overrides))
    batch = jax.device_put(host_batch, exp.batch_sharding)
    holder = {"state": exp.init_state()}
    compiled, args, per_call = compile_trainer_call(exp, holder["state"], batch)

    def call() -> float:
        start = time.perf_counter()
        holder["state"], metrics = compiled(holder["state"], args)
        jax.block_until_ready((holder["state"], metrics))
        return time.perf_counter() - start

    return call, per_call, compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bench", choices=tuple(BENCHES), default="t5",
                        help="t5_peers.py's T5 config (default) or bert_peers.py's BERT mini")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=OVERRIDE[,OVERRIDE...] (replaces the default two)")
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="seconds to wait for other processes to leave the CPUs per round")
    args = parser.parse_args(argv)
    variants = ({name: [o for o in spec.split(",") if o] for name, spec in
                 (v.split("=", 1) for v in args.variant)} if args.variant else DEFAULT_VARIANTS)
    runs = {}
    for name, overrides in variants.items():
        call, per_call, temp = build_call(overrides, args.bench)
        call()  # warm-up
        runs[name] = {"call": call, "per_call": per_call, "temp": temp, "seconds": []}
    for round_index in range(args.rounds):
        if args.quiet_wait:
            wait_for_quiet(args.quiet_wait)
        for run in runs.values():
            run["seconds"].append(run["call"]())
        print(f"round {round_index}: " + ", ".join(
            f"{name} {1e3 * run['seconds'][-1] / run['per_call']:.0f} ms/step"
            for name, run in runs.items()), flush=True)
    first = runs[next(iter(runs))]
    for name, run in runs.items():
        per_round = [a / b for a, b in zip(run["seconds"], first["seconds"], strict=True)]
        step_ms = 1e3 * statistics.median(run["seconds"]) / run["per_call"]
        print(f"{name:<16} {step_ms:8.1f} ms/step  x{statistics.median(per_round):.3f} "
              f"({min(per_round):.3f}-{max(per_round):.3f}) of {next(iter(runs))}  "
              f"XLA temporaries {run['temp'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()  # as the t5x-like command runs (host_memory.py)
    sys.exit(main())
