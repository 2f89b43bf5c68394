"""Two real processes on this machine (gloo collectives on 127.0.0.1), 2 fake CPU devices each.

The oracle is a single process with 4 devices fed the same global batches: host i of 2 reads
shard i of the stream (``train.device_batches``), so the reference concatenates shard 0's and
shard 1's local batches in process order. Matching it to 1e-5, step by step, shows that the
per-host batches land in the right rows of the global array, that gradients are reduced
across processes and that the update is the same; the checkpoint the two processes wrote must
restore in one process to the reference parameters.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli

from t5x_like.launch import local

STEPS = 3
RUN_OVERRIDES = [
    *TINY_OVERRIDES,
    f"--config.train.num_steps={STEPS}",
    f"--config.train.checkpoint_every={STEPS}",
    f"--config.train.eval_every={STEPS}",
    "--config.train.eval_batches=1",
]

REFERENCE = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from t5x_like import config as config_lib
    from t5x_like.evaluation.driver import load_checkpoint
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    config = config_lib.load_config(CONFIG, OVERRIDES)
    exp = build(config)
    assert jax.process_count() == 1 and len(exp.mesh.devices.flat) == 4
    state, step = exp.init_state(), make_train_step(exp)
    half = config.data.batch_size // 2
    shards = [exp.family.batches(split="train", batch_size=half, shuffle=True, repeat=True,
                                 skip_batches=0, shard_index=i, num_shards=2) for i in range(2)]
    losses = []
    for _ in range(STEPS):
        local = [next(s) for s in shards]
        batch = jax.tree.map(lambda *xs: jax.device_put(np.concatenate(xs), exp.batch_sharding),
                             *local)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    _, restored, restored_step = load_checkpoint(WORKDIR)
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)
                         for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}
    np.savez(OUT + "/reference.npz", **flat(state["params"]))
    np.savez(OUT + "/restored.npz", **flat(restored))
    print("RESULT" + json.dumps({"losses": losses, "restored_step": restored_step}))
    """
)


def _python(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mp") / "run"
    result = run_cli(
        "launch", "local", "--processes=2", "--devices-per-process=2", "--",
        "train", "--config", TINY_CONFIG, "--workdir", str(workdir), *RUN_OVERRIDES,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return workdir, result


@pytest.mark.multiprocess
def test_two_processes_match_one_process_and_their_checkpoint_restores(two_process_run, tmp_path):
    workdir, result = two_process_run
    for i in (0, 1):  # both processes ran and finished the run
        assert f"[{i}] step {STEPS}: eval loss" in result.stdout
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    # process 0 alone writes metrics: one row per step, not two
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))

    overrides = [o.removeprefix("--") for o in RUN_OVERRIDES]
    script = (
        f"CONFIG, OVERRIDES, STEPS = {TINY_CONFIG!r}, {overrides!r}, {STEPS}\n"
        f"WORKDIR, OUT = {str(workdir)!r}, {str(tmp_path)!r}\n" + REFERENCE
    )
    ref = _python(script, {"XLA_FLAGS": f"{local.DEVICE_COUNT_FLAG}=4", "JAX_PLATFORMS": "cpu"})
    assert ref.returncode == 0, ref.stderr[-4000:]
    out = json.loads(ref.stdout.split("RESULT", 1)[1])

    np.testing.assert_allclose(
        [r["train/loss"] for r in train_rows], out["losses"], rtol=0, atol=1e-5
    )
    assert out["losses"][-1] < out["losses"][0]  # the parameters moved: not a vacuous match
    assert out["restored_step"] == STEPS
    reference, restored = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "restored.npz")
    assert sorted(reference.files) == sorted(restored.files) and len(reference.files) > 10
    for name in reference.files:
        np.testing.assert_allclose(restored[name], reference[name], rtol=0, atol=1e-5,
                                   err_msg=name)


UNEVEN = textwrap.dedent(
    """
    from t5x_like import distributed
    cluster = distributed.initialize()
    items = range(3 + 2 * cluster.process_id)  # process 0 has 3 items, process 1 has 5
    print("RESULT", cluster.process_id, cluster.num_processes,
          list(distributed.until_any_exhausted(iter(items))))
    """
)


@pytest.mark.multiprocess
def test_hosts_with_uneven_shards_stop_together():
    """A finite split read in shards ends at different batches on different hosts; every
    host must stop at the shortest, or the others would wait forever in a collective."""
    port = local.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UNEVEN],
            cwd=ROOT,
            env=local.process_env(os.environ, index=i, processes=2, port=port, devices=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(out.split("RESULT", 1)[1].strip() for out, _ in outputs)
    assert lines == ["0 2 [0, 1, 2]", "1 2 [0, 1, 2]"]


@pytest.mark.multiprocess
def test_no_coordinator_is_one_sentence(tmp_path):
    port = local.free_port()  # nothing listens there
    result = run_cli(
        "train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "w"),
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
        env={"T5X_LIKE_INIT_TIMEOUT": "2"},
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: process 1 found no coordinator at 127.0.0.1:{port} within 2 s")
    assert not (tmp_path / "w").exists()  # it stopped before doing anything
