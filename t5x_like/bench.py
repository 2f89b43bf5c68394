"""``t5x-like bench``: the trainer's own step on synthetic batches -> step time, tokens/s,
model TFLOP/s, MFU and XLA's memory estimate.

The step is the one ``train.py`` runs (``make_train_step``: objective on device, loss, optax
update, donated state), compiled once with ``lower(...).compile()``; its executable is then
called ``warmup`` times and timed ``steps`` times, each call synchronised. With
``train.steps_per_call`` k > 1 (the full-size presets) it is the trainer's k-step call
(``make_multi_step``), timed in whole calls (``steps`` and ``warmup`` rounded up to multiples of
k) and reported per step, as the trainer runs it. Model FLOPs come
from the analytic count in ``flops.py`` (not from XLA, which undercounts scanned layers);
MFU = model FLOP/s / (peak FLOP/s per device x devices). Peaks are bf16 dense figures from the
vendors' data sheets, looked up from ``jax.devices()[0].device_kind``; on a CPU (or anything
not in the table) MFU is reported only against ``--peak-tflops``, a number or ``measure`` (the
rate of a large float32 matmul on this device, timed here).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t5x_like import flops
from t5x_like.errors import UserError

# bf16 dense peak TFLOP/s per device (one chip; one GPU), by device_kind substring, most
# specific first. Sources: Cloud TPU system architecture pages; NVIDIA A100/H100/H200 data
# sheets (SXM; PCIe and NVL H100s are slower and listed separately).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v4", 275.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def device_peak_tflops(device_kind: str) -> float | None:
    """The table's bf16 peak for a device kind, or None (CPUs, unknown accelerators)."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def measure_matmul_tflops(size: int = 2048, repeats: int = 5) -> float:
    """TFLOP/s of a ``size``-square float32 matmul on the default device (median of repeats)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x).lower(a).compile()
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def parse_peak(text: str) -> float | None:
    """``--peak-tflops``: "" (use the table), a number, or "measure" (time a matmul here)."""
    if not text:
        return None
    if text == "measure":
        peak = measure_matmul_tflops()
        print(f"peak: {peak:.3f} TFLOP/s per device, measured (float32 2048^3 matmul)")
        return peak
    try:
        peak = float(text)
    except ValueError:
        peak = 0.0
    if not peak > 0:
        raise UserError(f"--peak-tflops takes a positive number or 'measure', got {text!r}")
    return peak


def synthetic_batch(exp, seed: int = 0) -> dict:
    """A host batch of uniform random ids shaped like the family's stream, placed on the mesh.

    Families whose host batch is the default ``{'tokens': [B, raw_length]}`` get random ids;
    others (sentence pairs, document boundaries) get their first real batch, reused.
    """
    from t5x_like.families.base import Family

    family, batch_size = exp.family, exp.config.data.batch_size
    if type(family).batches is Family.batches:
        rng = np.random.default_rng(seed)
        high = max(exp.vocabulary.vocab_size - 100, 3)  # below T5's sentinels
        host = {"tokens": rng.integers(2, high, (batch_size, family.raw_length), dtype=np.int32)}
    else:
        host = next(iter(family.batches(split="train", batch_size=batch_size, shuffle=False,
                                        repeat=True, skip_batches=0, shard_index=0,
                                        num_shards=1)))
    return jax.tree.map(lambda x: jax.device_put(x, exp.batch_sharding), host)


def compile_trainer_call(exp, state: dict, batch: dict) -> tuple[Any, Any, int]:
    """The call ``t5x-like train`` makes with ``exp``'s config, compiled: one step
    (``make_train_step``) or ``train.steps_per_call`` k steps over k batches (``make_multi_step``,
    here k times ``batch``). Returns the executable (``lower(...).compile()``: calling the jitted
    function instead would compile again), its batch argument and k."""
    from t5x_like.train import make_multi_step, make_train_step

    per_call = int(exp.config.train.steps_per_call)
    if per_call == 1:
        return make_train_step(exp).lower(state, batch).compile(), batch, 1
    args = (batch,) * per_call
    return make_multi_step(exp, per_call).lower(state, args).compile(), args, per_call


def run(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
        peak_tflops: float | None = None) -> dict:
    """Times ``steps`` training steps of ``config`` and returns the measurements (one row)."""
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    if steps < 1 or warmup < 0:
        raise UserError(f"bench needs --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    exp = build(config)
    batch = synthetic_batch(exp)
    state = exp.init_state()
    compile_start = time.perf_counter()
    compiled, args, per_call = compile_trainer_call(exp, state, batch)
    compile_s = time.perf_counter() - compile_start
    for _ in range(-(-warmup // per_call)):
        state, metrics = compiled(state, args)
    jax.block_until_ready((state, metrics) if warmup else state)
    times = []
    for _ in range(-(-steps // per_call)):
        start = time.perf_counter()
        state, metrics = compiled(state, args)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / per_call)
    loss = float(jnp.ravel(metrics["loss"])[-1])
    if not np.isfinite(loss):
        raise UserError(f"the benchmark's loss became non-finite ({loss}); check model.dtype")

    step_s = statistics.median(times)
    count = flops.count(exp.family, exp.config.data.batch_size)
    devices = exp.mesh.devices.size
    kind = jax.devices()[0].device_kind
    peak = peak_tflops if peak_tflops is not None else device_peak_tflops(kind)
    model_tflops = count.training / step_s / 1e12
    memory = compiled.memory_analysis()
    # XLA's cost analysis counts a loop body once, whatever its trip count: for k steps a call
    # the FLOPs of one step come from that step's own (uncompiled) HLO.
    cost = (compiled.cost_analysis() if per_call == 1
            else make_train_step(exp).lower(state, batch).cost_analysis())
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mib = 2.0**20
    m = exp.config.model
    return {
        "config": f"d_model {m.d_model}, {m.get('num_encoder_layers', m.get('num_layers', '?'))}"
                  f"+{m.get('num_decoder_layers', 0)} layers",
        "params": int(exp.family.num_params),
        "batch": int(exp.config.data.batch_size),
        "dtype": m.get("dtype", "float32"),
        "remat": m.get("remat_policy", "none"),
        "scan_layers": bool(m.get("scan_layers", False)),
        "device": f"{devices} x {kind}",
        "steps_per_call": per_call,
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "compile_s": compile_s,
        "tokens_per_step": count.tokens,
        "tokens_per_s": count.tokens / step_s,
        "model_tflop_per_step": count.training / 1e12,
        "model_tflops": model_tflops,
        "xla_tflop_per_step": float(cost.get("flops", float("nan"))) / 1e12 if cost else None,
        "peak_tflops_per_device": peak,
        "mfu": model_tflops / (peak * devices) if peak else None,
        "memory_mib": {
            "arguments": memory.argument_size_in_bytes / mib,
            "outputs": memory.output_size_in_bytes / mib,
            "aliased": memory.alias_size_in_bytes / mib,
            "temp": memory.temp_size_in_bytes / mib,
            "peak": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / mib,
        },
        "loss": loss,
    }


def format_row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    return (f"{r['config']:<24} {r['dtype']:<8} {r['remat']:<7} batch {r['batch']:<4} "
            f"{r['steps_per_call']:>2} steps/call "
            f"{r['step_ms']:9.1f} ms  {r['tokens_per_s']:10.0f} tok/s  "
            f"{r['model_tflops']:8.3f} TFLOP/s  MFU {mfu:>6}  "
            f"peak mem {r['memory_mib']['peak']:8.1f} MiB (temp {r['memory_mib']['temp']:.1f})")
