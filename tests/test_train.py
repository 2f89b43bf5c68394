"""End to end through the CLI, as a user runs it: train, exact resume, fallback past a corrupt
checkpoint, data parallelism on 8 fake devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli
from numerics import assert_close_at_scale


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _train(workdir, *extra):
    result = run_cli(
        "train", "--config", TINY_CONFIG, "--workdir", str(workdir), *TINY_OVERRIDES, *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """20 steps in one process; and 10 steps, process exit, then 10 more in a new process."""
    base = tmp_path_factory.mktemp("resume")
    straight, resumed = base / "straight", base / "resumed"
    _train(straight)
    _train(resumed, "--config.train.num_steps=10")
    second = _train(resumed)
    assert "resumed from step 10" in second.stdout
    return straight, resumed


def _params(workdir):
    from t5x_like.evaluation.driver import load_checkpoint

    _, params, step = load_checkpoint(workdir)
    return jax.device_get(params), step


def test_training_lowers_the_loss(straight_and_resumed):
    straight, _ = straight_and_resumed
    losses = _losses(straight)
    assert sorted(losses) == list(range(1, 21))
    assert np.mean([losses[s] for s in (18, 19, 20)]) < losses[1] - 1.0
    config = json.loads((straight / "config.json").read_text())
    assert config["model"]["vocab_size"] == 8192  # resolved from the 8100-id vocabulary
    assert (straight / "tensorboard").is_dir()


def test_resume_is_bit_identical_and_consumes_the_same_data(straight_and_resumed):
    straight, resumed = straight_and_resumed
    a, step_a = _params(straight)
    b, step_b = _params(resumed)
    assert step_a == step_b == 20
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # Same data and masks after the restart: the per-step losses agree exactly.
    la, lb = _losses(straight), _losses(resumed)
    assert [la[s] for s in range(11, 21)] == [lb[s] for s in range(11, 21)]


def test_a_corrupt_latest_checkpoint_falls_back_and_says_so(straight_and_resumed, tmp_path, capsys):
    import shutil

    from t5x_like.evaluation.driver import load_checkpoint

    straight, _ = straight_and_resumed
    workdir = tmp_path / "copy"
    shutil.copytree(straight, workdir)
    state_dir = workdir / "checkpoints" / "20" / "state"
    files = sorted((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest = files[-1]
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
    _, _, step = load_checkpoint(workdir)
    assert step == 10
    out = capsys.readouterr().out
    assert "checkpoint step 20" in out and "unreadable" in out and "falling back" in out


def test_eval_reports_loss_accuracy_and_beats_nothing_silently(straight_and_resumed):
    straight, _ = straight_and_resumed
    result = run_cli(
        "eval",
        "--checkpoint",
        str(straight),
        "--batches",
        "2",
        "--json",
        str(straight / "eval.json"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((straight / "eval.json").read_text())
    assert report["step"] == 20 and report["tokens"] > 0
    assert 0.0 <= report["accuracy"] <= 1.0
    assert np.isfinite(report["loss"]) and np.isfinite(report["unigram_loss"])
    assert "validation loss" in result.stdout and "unigram baseline" in result.stdout


def test_mesh_that_does_not_divide_the_devices_is_one_sentence(tmp_path):
    result = run_cli(
        "train",
        "--config",
        TINY_CONFIG,
        "--workdir",
        str(tmp_path / "w"),
        *TINY_OVERRIDES,
        "--config.mesh.data=3",
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices")


DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, os
    import jax
    from jax.sharding import PartitionSpec as P
    from t5x_like import config as config_lib
    from t5x_like.experiment import build
    from t5x_like.train import device_batches, make_train_step

    config = config_lib.load_config(CONFIG, OVERRIDES)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        exp = build(config, devices)
        state = exp.init_state()
        step = make_train_step(exp)
        batches = device_batches(exp, split="train")
        losses = []
        for _ in range(3):
            batch = next(batches)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        out[name] = losses
        if name == "eight":
            out["batch_spec"] = [list(a) if isinstance(a, tuple) else a
                                 for a in batch["tokens"].sharding.spec]
            out["batch_shards"] = len(batch["tokens"].addressable_shards)
            leaves = jax.tree.leaves(state)
            out["replicated"] = all(x.sharding.is_fully_replicated for x in leaves)
            out["param_devices"] = sorted({len(x.sharding.device_set) for x in leaves})
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow  # the data8 mesh of tests/test_sharding.py covers it in the default run
def test_data_parallel_on_8_devices_matches_one_device():
    overrides = [o.removeprefix("--") for o in TINY_OVERRIDES]
    script = f"CONFIG = {TINY_CONFIG!r}\nOVERRIDES = {overrides!r}\n" + DATA_PARALLEL_SCRIPT
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(out["eight"], out["one"], rtol=0, atol=1e-5)
    assert out["batch_shards"] == 8
    assert out["batch_spec"] == [["data", "fsdp"]]
    # Pure data parallelism: every state array is replicated on all 8 devices.
    assert out["param_devices"] == [8]
    assert out["replicated"]


def test_gradient_accumulation_gives_the_same_gradient(tiny_config):
    """Two or four micro-batches sum to the gradient of the whole batch."""
    from t5x_like.experiment import build
    from t5x_like.train import accumulate_gradients, device_batches

    exp = build(tiny_config)
    params = exp.init_state()["params"]
    batch = next(device_batches(exp, split="train"))
    features = exp.family.features(batch, jax.random.key(3))
    key = jax.random.key(4)
    grads = {}
    for accum in (1, 2, 4):
        fn = jax.jit(lambda p, f, k, a=accum: accumulate_gradients(exp.family, p, f, k, a))
        grads[accum] = jax.device_get(fn(params, features, key))
    g1, s1, _ = grads[1]
    assert s1["weight"] > 0
    for accum in (2, 4):
        g, s, _ = grads[accum]
        assert s["weight"] == s1["weight"]
        np.testing.assert_allclose(s["loss"], s1["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1), strict=True):
            assert_close_at_scale(a, b)
