"""What the per-family training tests share: the 20-step run settings, a compilation cache,
runs checked for a falling loss and a bit-exact resume from step 10, and a script run once
in a subprocess with 8 fake CPU devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

# 20 tiny steps, a checkpoint at 10 (to resume from) and 20, one evaluation batch at the end.
RUN = [
    "data.inputs_length=32",
    "data.batch_size=8",
    "train.num_steps=20",
    "train.log_every=1",
    "train.eval_every=20",
    "train.eval_batches=1",
    "train.checkpoint_every=10",
    "train.progress_bar=False",
    "optimizer.warmup_steps=5",
    "optimizer.learning_rate=0.003",
]


def on_8_devices(script: str, root: Path, *, timeout: int = 1800) -> dict:
    """The JSON a script prints after ``RESULT``, run in a subprocess with 8 fake devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT", 1)[1])


# Two AdamW steps of one config on 1 device, then as fsdp 8 and as tensor 8, from the same
# initial state and batch: the losses, the largest parameter difference to the one-device run,
# and how many parameter leaves are sharded. PATH and OVERRIDES are set in front of it.
MESH_SCRIPT = """
import json
import jax, numpy as np
from t5x_like import config as config_lib
from t5x_like.experiment import build
from t5x_like.train import make_train_step

out, reference, host, initial = {}, None, None, None
for name, (rules, fsdp, tensor) in [("one", ("dp", 1, 1)), ("fsdp8", ("fsdp", 8, 1)),
                                    ("tensor8", ("tensor", 1, 8))]:
    config = config_lib.load_config(PATH, OVERRIDES + [
        f"mesh.rules={rules}", "mesh.data=1", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])
    exp = build(config, jax.devices()[: fsdp * tensor])
    if host is None:
        host = next(exp.family.batches(split="train", batch_size=8, shuffle=True, repeat=True,
                                       skip_batches=0, shard_index=0, num_shards=1))
        initial = jax.device_get(exp.init_state())
    state = jax.device_put(initial, exp.state_shardings)
    step = make_train_step(exp)
    losses = []
    for _ in range(2):
        state, metrics = step(state, jax.device_put(host, exp.batch_sharding))
        losses.append(float(metrics["loss"]))
    params = jax.device_get(state["params"])
    reference = params if reference is None else reference
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
    sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state["params"]))
    out[name] = {"losses": losses, "diff": diff, "sharded": sharded}
print("RESULT" + json.dumps(out))
"""


def two_steps_on_meshes(config_spec: str, overrides: list[str], root: Path) -> dict:
    """``MESH_SCRIPT``'s result for one config: {"one"|"fsdp8"|"tensor8": {losses, diff,
    sharded}}."""
    return on_8_devices(f"PATH = {config_spec!r}\nOVERRIDES = {list(overrides)!r}\n"
                        + MESH_SCRIPT, root)


def compilation_cache_env(tmp_path_factory):
    """Generator for a module fixture: a persistent compilation cache for the module and the
    CLI runs it starts (a resumed run reads back what the run it resumes compiled, about 5x
    faster here); yields the env for subprocesses and restores the previous setting."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    folder = str(tmp_path_factory.mktemp("jax_cache"))
    saved = (jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": folder, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    cc.reset_cache()


def logged_losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def restart_from_step_10(straight: Path, resumed: Path) -> None:
    """A copy of a finished 20-step run as it was after step 10: checkpoint 20 and the metric
    lines after step 10 removed."""
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    shutil.rmtree(resumed / "tensorboard")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 10]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def checkpoint_params(workdir: Path):
    from t5x_like.evaluation.driver import load_checkpoint

    exp, params, step = load_checkpoint(workdir)
    return exp, jax.device_get(params), step


def check_run(straight: Path, resumed: Path, *, min_drop: float) -> None:
    """The mean of the last five losses is ``min_drop`` below the first five; the resumed run
    ends with bit-identical parameters and logs the same losses for steps 11-20."""
    losses = logged_losses(straight)
    assert sorted(losses) == list(range(1, 21))
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(16, 21)])
    assert last < first - min_drop, (first, last)
    _, a, step_a = checkpoint_params(straight)
    _, b, step_b = checkpoint_params(resumed)
    assert step_a == step_b == 20
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    again = logged_losses(resumed)
    assert [again[s] for s in range(11, 21)] == [losses[s] for s in range(11, 21)]


def cli_in_process(root: Path, *argv: str) -> str:
    """``t5x-like ARGV`` through the CLI's own entry point in this process (no interpreter
    start-up or imports to pay again); its stdout."""
    import contextlib
    import io

    from t5x_like import cli

    os.chdir(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


def step_zero_workdir(config, workdir: Path) -> Path:
    """A workdir holding ``config``'s freshly initialised state as checkpoint 0: a frozen
    teacher whose outputs a test needs, without compiling a train step for it."""
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.experiment import build

    exp = build(config)
    workdir.mkdir()
    exp.write_config(workdir)
    checkpoints = Checkpoints(workdir)
    checkpoints.save(0, exp.init_state(), {"batches_consumed": 0, "step": 0})
    checkpoints.close()
    return workdir


# How far the first gradient on 8 devices may move from the one-device one, at its leaf's
# scale: reordering a float32 sum of n = 256 token terms moves it by ~sqrt(n) eps = 1.9e-6 of
# the terms' magnitude, more where they cancel (measured 6e-7 to 2.8e-6 on fsdp 8, the largest
# RoBERTa's MLM transform kernel: ~40 masked tokens' outer products). A wrong reduction or a
# misplaced shard moves a gradient by its own scale (1), five orders of magnitude above.
GRADIENT_BOUND = 5e-6

# What the 8-device family scripts compare against the one-device run: the first gradient at
# its leaf's scale and the parameters where AdamW's update is well-conditioned (see
# test_encoder_families.test_two_steps_on_8_devices_match_one_device's docstring).
COMPARE = textwrap.dedent(
    """
    import jax, numpy as np

    def flat(tree):
        return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
                for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    def adam_moments(opt_state):
        \"\"\"{"mu"/"nu": {parameter path: AdamW's first/second moment}} of optax's state.\"\"\"
        out = {"mu": {}, "nu": {}}
        for key, value in flat(opt_state).items():
            for name in out:
                if "." + name + "[" in key:
                    out[name][key.split("." + name, 1)[1]] = value
        assert out["mu"] and out["mu"].keys() == out["nu"].keys(), list(flat(opt_state))[:5]
        return out

    def well_conditioned(moments, b2, eps):
        \"\"\"Elements whose AdamW update g/(sqrt(v)+eps) is well-conditioned at every step:
        sqrt(v_hat) >= 10 eps, or exactly 0 (no gradient yet: the update is weight decay).\"\"\"
        mask = {}
        for name in moments[0]["nu"]:
            ok = True
            for t, m in enumerate(moments, start=1):
                root = np.sqrt(m["nu"][name] / (1 - b2**t))
                ok = ok & ((root == 0) | (root >= 10 * eps))
            mask[name] = ok
        return mask

    def compare(run, reference, conditioned):
        mu, ref_mu = run["moments"][0]["mu"], reference["moments"][0]["mu"]
        floor = 1e-3 * max(np.abs(v).max() for v in ref_mu.values())
        params, ref = run["params"], reference["params"]
        assert params.keys() == ref.keys() == conditioned.keys()
        # the first gradient (mu = (1 - b1) g), at its leaf's scale
        grad = {k: float(np.abs(mu[k] - ref_mu[k]).max() / max(np.abs(ref_mu[k]).max(), floor))
                for k in mu}
        return {
            "gradient_diff": max(grad.values()),
            "gradient_worst_leaf": max(grad, key=grad.get),
            "conditioned_diff": max(float(np.abs(params[k] - ref[k])[conditioned[k]].max(
                initial=0.0)) for k in params),
            "conditioned_share": float(sum(m.sum() for m in conditioned.values())
                                       / sum(m.size for m in conditioned.values())),
            "diff": max(float(np.abs(params[k] - ref[k]).max()) for k in params),
        }
    """
)
