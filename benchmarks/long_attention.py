"""Long sequences: XLA peak memory and step time of Longformer and Reformer against full
attention at 1k, 4k and 16k tokens, on this CPU.

    JAX_PLATFORMS=cpu python benchmarks/long_attention.py [--lengths 1024 4096 16384] [--json F]

Each model is two layers, hidden 64, 2 heads of 32, FFN 256, batch 1, float32; the step is
forward + backward of mean(last_hidden_state**2) w.r.t. every parameter (the attention and
FFN work without a vocabulary-sized head). Memory is XLA's own count for the compiled step
(``compiled.memory_analysis()``: temporaries, and temporaries + arguments + outputs), exact
whatever else runs on the machine. Time is the median of 3 synchronised steps after one
warm-up; a configuration whose temporaries exceed ``--max-run-gib`` is compiled (memory
reported) but not run.

- full: the RoBERTa encoder (``models/encoder.py``), dense softmax attention.
- longformer: window 256 (128 each side), no global tokens (``models/longformer.py``).
- reformer: LSH attention, chunks of 64, 2 hash rounds, L / 64 buckets, reversible layers and
  a feed-forward chunked by 1,024 positions (``models/reformer.py``); ``reformer_stored`` is
  the same with ``reversible=False`` (activations stored, for the reversible saving).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import t5x_like  # noqa: F401  (eager sharding off)
from t5x_like.models.encoder import EncoderModel
from t5x_like.models.encoder_config import EncoderConfig
from t5x_like.models.longformer import LongformerConfig, LongformerModel
from t5x_like.models.reformer import Reformer, ReformerConfig

GIB = 1 << 30
H, HEADS, FF, LAYERS, VOCAB = 64, 2, 256, 2, 1000


def build(kind: str, length: int) -> nnx.Module:
    rngs = nnx.Rngs(0)
    common = dict(vocab_size=VOCAB, hidden_size=H, num_layers=LAYERS, num_heads=HEADS,
                  intermediate_size=FF, max_position_embeddings=length + 2, position_offset=2,
                  type_vocab_size=1, pooler=False, mlm_head=False, hidden_dropout_rate=0.0,
                  attention_dropout_rate=0.0, scan_layers=True)
    if kind == "full":
        return EncoderModel(EncoderConfig(model_type="roberta", nsp_head=False, **common),
                            rngs=rngs)
    if kind == "longformer":
        return LongformerModel(LongformerConfig(attention_window=256, **common), rngs=rngs)
    c = ReformerConfig(vocab_size=VOCAB, hidden_size=H, num_heads=HEADS, head_dim=H // HEADS,
                       feed_forward_size=FF, num_layers=LAYERS, max_position_embeddings=length,
                       num_buckets=max(2, length // 64), num_hashes=2, lsh_chunk_length=64,
                       chunk_size_feed_forward=min(length, 1024), causal=False,
                       hidden_dropout_rate=0.0, reversible=kind == "reformer")
    return Reformer(c, rngs=rngs, lm_head=False)


def measure(kind: str, length: int, max_run_gib: float) -> dict:
    graphdef, params = nnx.split(build(kind, length))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (1, length)), jnp.int32)

    def loss(p):
        out = nnx.merge(graphdef, p)(ids)
        return jnp.mean(out["last_hidden_state"] ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    compiled = step.lower(params).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    row = {"kind": kind, "length": length, "compile_s": round(compile_s, 1),
           "temp_gib": m.temp_size_in_bytes / GIB,
           "total_gib": (m.temp_size_in_bytes + m.argument_size_in_bytes
                         + m.output_size_in_bytes) / GIB}
    if row["temp_gib"] > max_run_gib:
        row["step_s"] = None
        return row
    jax.block_until_ready(compiled(params))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(time.perf_counter() - start)
    row["step_s"] = statistics.median(times)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--kinds", nargs="+",
                        default=["full", "longformer", "reformer", "reformer_stored"])
    parser.add_argument("--max-run-gib", type=float, default=3.0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows = []
    print("| model | tokens | XLA temporaries (GiB) | + args/outputs (GiB) | step (s) |")
    print("|---|---:|---:|---:|---:|")
    for length in args.lengths:
        for kind in args.kinds:
            row = measure(kind, length, args.max_run_gib)
            rows.append(row)
            step = "not run" if row["step_s"] is None else f"{row['step_s']:.3f}"
            print(f"| {kind} | {length} | {row['temp_gib']:.3f} | {row['total_gib']:.3f} | "
                  f"{step} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
