"""T5 v1.1 pretrained with span corruption (noise density 0.15, mean span 3).

    t5x-like train --config configs/t5_span_corruption.py:tiny --workdir runs/t5_tiny
    t5x-like train --config configs/t5_span_corruption.py:base --workdir runs/t5_base \
        --config.data.task=my_corpus --config.train.num_steps=524288

Presets: ``tiny`` (a few minutes on a laptop CPU, what ``make demo`` trains), ``small``,
``base`` and ``large`` (T5 v1.1 sizes, 512 input tokens / 114 targets, Adafactor with the
rsqrt schedule, z-loss 1e-4, no dropout in pretraining).

Stacks of up to 12 layers are unrolled, as T5X's T5 is. ``large`` scans its 24 + 24 layers,
which keeps its compile time short, and keeps only the matmul outputs and attention's softmax
probabilities for the backward pass (``remat_policy="dots"``; GELU and norms are recomputed): a
scanned stack zero-fills, writes and reads back a stacked buffer for every activation it
keeps. On one CPU device its loop runs two layers a trip (``model.scan_unroll``). On the
``make bench`` config at 10 steps a call that costs 0.4-2.4% of a step with the command's huge
pages and the rematerialised layers' row-major weight gradients (``benchmarks/scan_overhead.py``,
one process, five runs, 2026-12-05); 2-5% before those gradients, one layer a trip 4-6.5%, and
7-10% before huge pages. In one earlier process, this policy 1.080x
the unrolled step, the matmul outputs alone 1.101x, every activation 1.158x
(benchmarks/RESULTS.md).
``--config.model.scan_layers``, ``--config.model.remat_policy`` and
``--config.model.scan_unroll`` override.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model d_kv heads d_ff  enc dec
    "tiny": (128, 32, 4, 512, 2, 2),
    "small": (512, 64, 6, 1024, 8, 8),
    "base": (768, 64, 12, 2048, 12, 12),
    "large": (1024, 64, 16, 2816, 24, 24),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config()
    d_model, d_kv, heads, d_ff, enc, dec = SIZES[preset]
    c.model.update(dict(d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff,
                        num_encoder_layers=enc, num_decoder_layers=dec))
    if preset == "tiny":
        # Sized for `make demo`: ~0.3 s a step on 2 CPU cores. tiny_run unrolls the layers: on
        # CPU a scanned stack costs more per step (above; benchmarks/RESULTS.md).
        c.data.inputs_length = 128
        presets.tiny_run(c, batch_size=16, learning_rate=0.01, warmup_steps=200)
    else:
        c.data.inputs_length = 512
        c.model.scan_layers = enc > 12
        c.model.remat_policy = "dots" if c.model.scan_layers else "none"
        presets.full_run(c, batch_size=128, num_steps=524_288)
    c.lock()
    return c
