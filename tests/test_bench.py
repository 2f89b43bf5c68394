"""``t5x-like bench``: peak table, the measured row's arithmetic, remat's effect on memory,
bfloat16 compute with float32 weights, and the CLI verb."""

import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli
from flax import nnx

from t5x_like import bench, flops
from t5x_like.errors import UserError
from t5x_like.models.t5 import T5, T5Config

OVERRIDES = [o.removeprefix("--") for o in TINY_OVERRIDES]


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v5p", 459.0),
        ("TPU v6 lite", 918.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("cpu", None),
    ],
)
def test_peak_table_by_device_kind(kind, peak):
    assert bench.device_peak_tflops(kind) == peak


def test_peak_flag():
    assert bench.parse_peak("") is None
    assert bench.parse_peak("1.5") == 1.5
    for bad in ("fast", "0", "-3"):
        with pytest.raises(UserError, match="--peak-tflops takes a positive number"):
            bench.parse_peak(bad)


def _config(*extra):
    from t5x_like import config as config_lib

    os.chdir(ROOT)
    return config_lib.load_config(TINY_CONFIG, [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def remat_rows():
    """One row per remat policy of a 4+4-layer scanned model (activations dominate memory)."""
    model = ["model.num_encoder_layers=4", "model.num_decoder_layers=4", "model.d_model=64",
             "model.d_ff=256", "model.num_heads=4", "model.d_kv=16", "data.inputs_length=128",
             "model.scan_layers=True"]
    return {remat: bench.run(_config(*model, f"model.remat_policy={remat}"), steps=1, warmup=0,
                             peak_tflops=0.5)
            for remat in ("none", "minimal", "full")}


def test_a_row_is_consistent_with_the_flop_count_and_the_clock(remat_rows):
    r = remat_rows["none"]
    assert r["batch"] == 8 and r["remat"] == "none" and r["scan_layers"]
    step_s = r["step_ms"] / 1e3
    assert r["step_ms_min"] <= r["step_ms"]
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / step_s)
    assert r["tokens_per_step"] == 8 * (128 + 29)  # inputs 128 -> span-corrupted targets 29
    assert r["model_tflops"] == pytest.approx(r["model_tflop_per_step"] / step_s)
    assert r["mfu"] == pytest.approx(r["model_tflops"] / 0.5)
    assert np.isfinite(r["loss"]) and r["loss"] > 0
    mem = r["memory_mib"]
    assert mem["peak"] == pytest.approx(mem["arguments"] + mem["outputs"] - mem["aliased"]
                                        + mem["temp"])
    assert mem["aliased"] > 0.9 * mem["outputs"]  # the state is donated: outputs reuse it
    model = T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=256, num_encoder_layers=4,
                     num_decoder_layers=4, vocab_size=8192)
    forward = flops.t5_forward_flops(model, batch=8, inputs_length=128, targets_length=29)
    assert r["model_tflop_per_step"] == pytest.approx(3 * sum(forward.values()) / 1e12)


def test_a_row_against_the_wall_clock_the_batch_and_xla():
    """Measured from outside ``bench.run``: its three timed steps fit in the wall-clock time
    of the call (the compile it reports aside), tokens/s is the synthetic batch's own token
    count per median step, and its FLOP count matches XLA's cost analysis of the same step
    compiled here (the analytic model count within 25% of XLA's, which adds the optimizer,
    loss and softmax arithmetic)."""
    import time

    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    config = _config()
    start = time.perf_counter()
    row = bench.run(config, steps=3, warmup=0, peak_tflops=0.5)
    wall = time.perf_counter() - start
    median_s, min_s = row["step_ms"] / 1e3, row["step_ms_min"] / 1e3
    assert row["compile_s"] + min_s + 2 * median_s <= wall  # 3 steps: min, median, >= median

    exp = build(config)
    batch = bench.synthetic_batch(exp)
    features = jax.device_get(exp.family.features(batch, jax.random.key(0)))
    tokens = int(np.asarray(features["inputs"]).size + np.asarray(features["targets"]).size)
    assert row["tokens_per_step"] == tokens
    assert row["tokens_per_s"] == pytest.approx(tokens / median_s)
    assert row["mfu"] == pytest.approx(row["model_tflop_per_step"] / median_s / 0.5)

    compiled = make_train_step(exp).lower(exp.init_state(), batch).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list | tuple) else cost)["flops"] / 1e12
    assert row["xla_tflop_per_step"] == pytest.approx(xla, rel=1e-6)
    assert 0.75 <= row["model_tflop_per_step"] / xla <= 1.0, row["model_tflop_per_step"] / xla


def test_a_row_of_several_steps_a_call_is_timed_in_whole_calls():
    """With ``train.steps_per_call=2`` the bench times the trainer's 2-step call: 3 steps become
    2 whole calls (4 steps) that fit in the wall clock, a step is half a call, and the FLOPs
    per step are one step's (XLA's count of the compiled 2-step loop is not doubled, so the
    row takes the single step's): within 1% of the single-step row compiled the usual way."""
    import time

    one = bench.run(_config(), steps=1, warmup=0, peak_tflops=0.5)
    start = time.perf_counter()
    row = bench.run(_config("train.steps_per_call=2"), steps=3, warmup=1, peak_tflops=0.5)
    wall = time.perf_counter() - start
    assert row["steps_per_call"] == 2 and one["steps_per_call"] == 1
    # warmup 1 -> one call; 3 steps -> two timed calls of 2 steps, each >= 2 * min step
    assert row["compile_s"] + 3 * 2 * row["step_ms_min"] / 1e3 <= wall
    assert row["xla_tflop_per_step"] == pytest.approx(one["xla_tflop_per_step"], rel=0.01)
    assert row["model_tflop_per_step"] == one["model_tflop_per_step"]
    assert np.isfinite(row["loss"])
    assert "2 steps/call" in bench.format_row(row)


def test_remat_trades_memory_for_nothing_else_it_computes(remat_rows):
    """Remat recomputes instead of storing: XLA's temp memory falls with each policy, and the
    loss is the same (the same arithmetic, repeated)."""
    temp = {k: r["memory_mib"]["temp"] for k, r in remat_rows.items()}
    assert temp["full"] < temp["minimal"] < temp["none"]
    assert temp["full"] < 0.5 * temp["none"]  # measured 28 vs 101 MiB
    losses = [r["loss"] for r in remat_rows.values()]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)
    flop_counts = {r["model_tflop_per_step"] for r in remat_rows.values()}
    assert len(flop_counts) == 1  # model FLOPs do not count recomputation


def _dot_dtypes(jaxpr) -> collections.Counter:
    """(lhs dtype, rhs dtype) of every dot_general, also inside jit/scan/remat bodies."""
    out = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dot_dtypes(inner)
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_weights(scan):
    config = T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_encoder_layers=2,
                      num_decoder_layers=2, vocab_size=256, dtype="bfloat16", scan_layers=scan)
    graphdef, params = nnx.split(T5(config, rngs=nnx.Rngs(0)), nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    x = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 200 + 1
    y = jnp.arange(2 * 8, dtype=jnp.int32).reshape(2, 8) % 200 + 1

    @jax.jit
    def forward(params):
        return nnx.merge(graphdef, params)(x, y)

    dots = _dot_dtypes(jax.make_jaxpr(forward)(params).jaxpr)
    # Every forward matmul (projections, attention, MLP, logits) takes bfloat16 operands.
    assert set(dots) == {("bfloat16", "bfloat16")} and sum(dots.values()) >= 20
    logits = forward(params)
    assert logits.dtype == jnp.float32  # logits accumulate in float32 for the loss
    grads = jax.jit(jax.grad(lambda p: jnp.mean(forward(p))))(params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    # Same weights in float32: bfloat16 (8-bit mantissa) moves logits by ~1% of their scale.
    f32_graphdef, _ = nnx.split(T5(dataclasses.replace(config, dtype="float32"),
                                   rngs=nnx.Rngs(0)), nnx.Param)
    reference = jax.jit(lambda p: nnx.merge(f32_graphdef, p)(x, y))(params)
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.05 * scale
    assert float(jnp.max(jnp.abs(logits - reference))) > 0  # it really is a different dtype


def test_bfloat16_training_step_keeps_float32_state():
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    exp = build(_config("model.dtype=bfloat16"))
    state = exp.init_state()
    state, metrics = make_train_step(exp)(state, bench.synthetic_batch(exp))
    dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
    assert dtypes == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow  # the CLI around bench.run, which test_a_row_... checks in the default run
def test_bench_verb_prints_and_writes_rows(tmp_path):
    """Without --peak-tflops a CPU has no peak in the table: TFLOP/s, but no MFU."""
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--config", TINY_CONFIG, "--steps", "1", "--warmup", "0",
                     "--remat", "full", "--json", str(out), *TINY_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["remat"] == "full" and row["device"] == "1 x cpu"
    assert row["mfu"] is None and row["peak_tflops_per_device"] is None
    assert row["model_tflops"] > 0 and row["tokens_per_s"] > 0
    (line,) = [line for line in result.stdout.splitlines() if "tok/s" in line]
    assert "MFU    n/a" in line and "TFLOP/s" in line and "peak mem" in line


def test_attention_implementation_is_validated():
    with pytest.raises(UserError, match="attention_implementation='flash' is not one of"):
        T5Config(attention_implementation="flash")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_attention_matches_xla_on_gpu():
    """cuDNN's fused attention gives T5's bf16 logits within bf16 noise of XLA's, and the
    bench finds an MFU for the device from the peak table."""
    kw = dict(d_model=256, d_kv=64, num_heads=4, d_ff=512, num_encoder_layers=2,
              num_decoder_layers=2, vocab_size=512, dtype="bfloat16")
    x = jnp.arange(4 * 128, dtype=jnp.int32).reshape(4, 128) % 500 + 1
    y = jnp.arange(4 * 32, dtype=jnp.int32).reshape(4, 32) % 500 + 1
    out = {}
    for impl in ("xla", "cudnn"):
        model = T5(T5Config(**kw, attention_implementation=impl), rngs=nnx.Rngs(0))
        out[impl] = jax.jit(lambda m: m(x, y))(model)
    scale = float(jnp.max(jnp.abs(out["xla"])))
    assert float(jnp.max(jnp.abs(out["cudnn"] - out["xla"]))) < 0.02 * scale
    assert bench.device_peak_tflops(jax.devices()[0].device_kind) is not None
