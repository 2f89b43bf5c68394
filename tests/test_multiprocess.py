"""Two real processes on this machine (gloo collectives on 127.0.0.1), 2 fake CPU devices each.

The oracle is a single process with 4 devices fed the same global batches: host i of 2 reads
shard i of the stream (``train.device_batches``), so the reference concatenates shard 0's and
shard 1's local batches in process order. Matching it to 1e-5, step by step, shows that the
per-host batches land in the right rows of the global array, that gradients are reduced
across processes and that the update is the same; the checkpoint the two processes wrote must
restore in one process to the reference parameters. The same reference evaluates the final
parameters on the eval split's first global batch (shard 0's and shard 1's eval batches,
concatenated) and recomputes the unigram baseline in NumPy from the same targets: the two
processes' evaluation, in the training loop and through ``t5x-like eval``, must give those
numbers.

A SIGTERM to one process (or to all) stops both at the step JAX's preemption sync point
picks, each saving that step and exiting 0; rerunning both resumes there and ends with
parameters bit-identical to the uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli
from family_runs import checkpoint_params

from t5x_like import distributed
from t5x_like.errors import UserError
from t5x_like.launch import local

STEPS = 6  # long enough that a SIGTERM after step 1 stops the run before the end
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

    # Evaluation of the final parameters on the first global eval batch, as two processes
    # assemble it, with the eval loop's key for batch 0.
    from t5x_like.evaluation.loop import EVAL_KEY_SALT, make_eval_step
    def global_batch(split, repeat, k):  # unshuffled, as evaluation reads
        streams = [exp.family.batches(split=split, batch_size=half, shuffle=False,
                                      repeat=repeat, skip_batches=0, shard_index=i,
                                      num_shards=2) for i in range(2)]
        for _ in range(k):
            yield jax.tree.map(lambda *xs: np.concatenate(xs), *[next(s) for s in streams])
    eval_key = jax.random.fold_in(exp.root_key, EVAL_KEY_SALT)
    (batch,) = global_batch(config.data.eval_split, False, 1)
    sums = make_eval_step(exp)(state["params"], jax.device_put(batch, exp.batch_sharding),
                               jax.random.fold_in(eval_key, 0), exp.initial_carry())
    scores = {k: float(v) for k, v in exp.family.summarize(jax.device_get(sums)).items()}
    # The unigram baseline in NumPy: add-one counts of 32 corrupted training batches (read
    # unshuffled, keys 0..31), scored on the same eval batch's targets.
    features = jax.jit(exp.family.features)
    vocab = exp.config.model.vocab_size  # resolved from the vocabulary
    counts = np.ones(vocab)
    scored = lambda f: np.asarray(f["targets"])[np.asarray(f["targets"]) > 0]
    for i, b in enumerate(global_batch("train", True, 32)):
        counts += np.bincount(scored(features(b, jax.random.key(i))), minlength=vocab)[:vocab]
    targets = scored(features(batch, jax.random.fold_in(eval_key, 0)))
    unigram = float(-np.log(counts / counts.sum())[targets].mean())
    print("RESULT" + json.dumps({"losses": losses, "restored_step": restored_step,
                                 "eval": scores, "unigram": unigram}))
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
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return workdir, result


@pytest.mark.multiprocess
def test_two_processes_match_one_process_and_their_checkpoint_restores(two_process_run,
                                                                       reference_numbers):
    workdir, result = two_process_run
    out, out_dir = reference_numbers
    for i in (0, 1):  # both processes ran and finished the run
        assert f"[{i}] step {STEPS}: eval loss" in result.stdout
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    # process 0 alone writes metrics: one row per step, not two
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))

    np.testing.assert_allclose(
        [r["train/loss"] for r in train_rows], out["losses"], rtol=0, atol=1e-5
    )
    assert out["losses"][-1] < out["losses"][0]  # the parameters moved: not a vacuous match
    assert out["restored_step"] == STEPS
    reference, restored = np.load(out_dir / "reference.npz"), np.load(out_dir / "restored.npz")
    assert sorted(reference.files) == sorted(restored.files) and len(reference.files) > 10
    for name in reference.files:
        np.testing.assert_allclose(restored[name], reference[name], rtol=0, atol=1e-5,
                                   err_msg=name)
    # The training loop's evaluation at the last step, on two processes, against one.
    (evaluated,) = [r for r in rows if "eval/loss" in r]
    assert evaluated["step"] == STEPS
    np.testing.assert_allclose(evaluated["eval/loss"], out["eval"]["cross_entropy"], rtol=1e-5)
    np.testing.assert_allclose(evaluated["eval/accuracy"], out["eval"]["accuracy"], atol=1e-6)


@pytest.fixture(scope="module")
def reference_numbers(two_process_run, tmp_path_factory):
    """One process's numbers for the two-process run (see the module docstring)."""
    workdir, _ = two_process_run
    out_dir = tmp_path_factory.mktemp("reference")
    overrides = [o.removeprefix("--") for o in RUN_OVERRIDES]
    script = (
        f"CONFIG, OVERRIDES, STEPS = {TINY_CONFIG!r}, {overrides!r}, {STEPS}\n"
        f"WORKDIR, OUT = {str(workdir)!r}, {str(out_dir)!r}\n" + REFERENCE
    )
    ref = _python(script, {"XLA_FLAGS": f"{local.DEVICE_COUNT_FLAG}=4", "JAX_PLATFORMS": "cpu"})
    assert ref.returncode == 0, ref.stderr[-4000:]
    return json.loads(ref.stdout.split("RESULT", 1)[1]), out_dir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_eval_matches_one_process_and_gathers_its_samples(two_process_run,
                                                                      reference_numbers,
                                                                      tmp_path):
    """``t5x-like eval`` on two processes gives one process's loss, accuracy and unigram
    baseline for the same checkpoint and global batch; the baseline and the span-filling
    samples read arrays sharded over both processes: each process gathers the whole of them
    and prints the same report."""
    workdir, _ = two_process_run
    out, _ = reference_numbers
    report = tmp_path / "eval.json"
    result = run_cli(
        "launch", "local", "--processes=2", "--devices-per-process=2", "--",
        "eval", "--checkpoint", str(workdir), "--batches", "1", "--samples", "2",
        "--json", str(report),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    scores = json.loads(report.read_text())
    assert scores["step"] == STEPS
    np.testing.assert_allclose(scores["loss"], out["eval"]["cross_entropy"], rtol=1e-5)
    np.testing.assert_allclose(scores["accuracy"], out["eval"]["accuracy"], atol=1e-6)
    np.testing.assert_allclose(scores["unigram_loss"], out["unigram"], rtol=1e-6)
    lines = {i: [x.split("] ", 1)[1] for x in result.stdout.splitlines()
                 if x.startswith(f"[{i}] ") and ("loss" in x or "model" in x)] for i in (0, 1)}
    assert lines[0] and lines[0] == lines[1]


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


HEARTBEAT_S = 10


def _complete_steps(workdir):
    folder = workdir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(name) for name in names if name.isdigit())


def _logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line cut by the kill
    return steps


def _start_pair(workdir, num_steps, logs, overrides=None, program1=None):
    """Starts processes 0 and 1 of one training run; their output goes to files named
    LOGS + out0, err0, ... (files, not pipes: nobody has to drain them). ``overrides``
    replace the default settings (a checkpoint every 2 steps, no evaluation); ``program1``
    (python's arguments before the CLI's) replaces ``-m t5x_like.cli`` for process 1."""
    port = local.free_port()
    overrides = overrides or [
        *TINY_OVERRIDES, f"--config.train.num_steps={num_steps}",
        "--config.train.checkpoint_every=2", "--config.train.eval_batches=0",
    ]
    args = [
        "train", "--config", TINY_CONFIG,
        "--workdir", str(workdir), f"--heartbeat-timeout={HEARTBEAT_S}", *overrides,
    ]
    procs = []
    for i in range(2):
        program = program1 if i == 1 and program1 else ["-m", "t5x_like.cli"]
        argv = [sys.executable, *program, *args]
        out = open(f"{logs}out{i}", "w+")  # noqa: SIM115
        err = open(f"{logs}err{i}", "w+")  # noqa: SIM115
        env = local.process_env(os.environ, index=i, processes=2, port=port, devices=2)
        procs.append((subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err), out, err))
    return procs


def _read(f):
    f.flush()
    f.seek(0)
    return f.read()


def _survivor_of_a_kill(procs, killed_at=None):
    """Waits (up to 120 s after process 1's death) for process 0 to exit; returns its exit
    status, stderr and the seconds from the kill to its exit. ``killed_at`` None: process 1
    kills itself, and its death is when ``wait`` saw it."""
    survivor, _, err = procs[0]
    try:
        if killed_at is None:
            procs[1][0].wait(timeout=300)
            killed_at = time.monotonic()
        survivor.wait(timeout=120 - (time.monotonic() - killed_at))
    except subprocess.TimeoutExpired:
        pytest.fail("process 0 was still running 120 s after process 1 died")
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"returncode": survivor.returncode, "stderr": _read(err),
            "took": time.monotonic() - killed_at}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Two processes train; once checkpoint 4 is complete, process 1 is SIGKILLed. Returns
    what process 0 did next (see ``_survivor_of_a_kill``) and how far the run got."""
    workdir = tmp_path_factory.mktemp("killed") / "run"
    procs = _start_pair(workdir, 100_000, f"{workdir.parent}/")
    deadline = time.monotonic() + 300
    while not [s for s in _complete_steps(workdir) if s >= 4]:
        if any(p.poll() is not None for p, _, _ in procs) or time.monotonic() > deadline:
            for p, _, _ in procs:
                p.kill()
            pytest.fail("the two processes never reached step 4: " + _read(procs[0][2])[-3000:])
        time.sleep(0.1)
    procs[1][0].send_signal(signal.SIGKILL)
    return {
        **_survivor_of_a_kill(procs, time.monotonic()),
        "workdir": workdir,
        "last_logged": max(_logged_steps(workdir)),
        "saved": max(_complete_steps(workdir)),
    }


def _assert_stopped_in_one_sentence(run):
    """Process 0 exits with the peer-lost status, its last line naming process 1, without a
    traceback, well within 2 minutes: our watchdog ended it, not JAX's heartbeat backstop
    (set more than twice as high, a C++ fatal log) nor its shutdown barrier (an abort)."""
    stderr = run["stderr"]
    assert run["returncode"] == distributed.PEER_LOST_EXIT, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: process 1 of 2 stopped responding (no heartbeat for {HEARTBEAT_S} s); this "
        f"run is stopping: restart all processes with the same command to resume from the "
        f"last checkpoint"
    )
    assert "Traceback" not in stderr and "Check failure" not in stderr, stderr[-3000:]
    assert run["took"] < 120
    print(f"survivor exited {run['took']:.1f} s after the kill (heartbeat timeout "
          f"{HEARTBEAT_S} s)")


@pytest.mark.multiprocess
def test_survivor_of_a_killed_process_stops_in_one_sentence(killed_run):
    """Process 0, left waiting in a collective that will never finish, stops in one line."""
    _assert_stopped_in_one_sentence(killed_run)


DIES_IN_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from t5x_like import checkpoints, cli
    save = checkpoints.Checkpoints.save
    def save_or_die(self, step, state, meta):
        if step == 4:
            self.wait()  # checkpoint 2 complete on both processes, then die in 4's save
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, step, state, meta)
    checkpoints.Checkpoints.save = save_or_die
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_peer_killed_during_a_save_is_named_not_the_save(tmp_path):
    """Process 1 dies in checkpoint 4's save (once checkpoint 2 is complete), so process 0's
    save is what fails first (a collective of orbax's or of our fingerprint, with gloo's
    "connection reset"): process 0 must still stop with the peer-lost sentence and status,
    not the save's error and an abort in JAX's shutdown barrier (a CI failure where the kill
    fell in a save)."""
    procs = _start_pair(tmp_path / "run", 100_000, f"{tmp_path}/", program1=["-c", DIES_IN_SAVE])
    run = _survivor_of_a_kill(procs)
    assert procs[1][0].returncode == -signal.SIGKILL, _read(procs[1][2])[-3000:]
    _assert_stopped_in_one_sentence(run)
    assert _complete_steps(tmp_path / "run") == [2], run["stderr"][-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_after_a_killed_process_a_rerun_of_both_resumes(killed_run):
    workdir, saved = killed_run["workdir"], killed_run["saved"]
    procs = _start_pair(workdir, saved + 2, f"{workdir.parent}/rerun-")
    for p, _, err_file in procs:
        p.wait(timeout=300)
        assert p.returncode == 0, _read(err_file)[-3000:]
    assert f"resumed from step {saved} in {workdir}" in _read(procs[0][1])
    print(f"steps lost: {killed_run['last_logged'] - saved} (logged "
          f"{killed_run['last_logged']} before the kill, resumed from {saved})")


def test_heartbeat_timeout_is_checked():
    assert distributed.resolve(None, {}).heartbeat_s == distributed.DEFAULT_HEARTBEAT_S
    env = {distributed.ENV_HEARTBEAT: "3"}
    with pytest.raises(UserError, match="heartbeat timeout must be at least 5 s, got 3"):
        distributed.resolve(None, env)
    with pytest.raises(UserError, match="T5X_LIKE_HEARTBEAT_TIMEOUT must be an integer"):
        distributed.resolve(None, {distributed.ENV_HEARTBEAT: "ten"})


class _FakeStore:
    """The two key-value calls the watchdog makes, in memory."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_watchdog_names_the_silent_process_not_a_finished_one_nor_itself_when_starved():
    store, now = _FakeStore(), [0.0]
    cluster = distributed.Cluster("explicit", "127.0.0.1:1", 3, 0, heartbeat_s=10)
    dog = distributed._Watchdog(store, cluster, clock=lambda: now[0])

    def tick(t, beats=()):
        now[0] = t
        for j in beats:
            store.values[f"{distributed.ALIVE_DIR}{j}"] = f"{t}"
        return dog.tick()

    assert tick(1, [1, 2]) is None and tick(2, [1]) is None
    store.values[f"{distributed.ALIVE_DIR}2"] = "exit"  # 2 finished: waits at JAX's shutdown
    assert [tick(t) for t in (4, 6, 8, 10, 11.9)] == [None] * 5  # 1 silent since t=2
    assert tick(12) == (
        "process 1 of 3 stopped responding (no heartbeat for 10 s); this run is stopping: "
        "restart all processes with the same command to resume from the last checkpoint"
    )
    # this thread itself not scheduled for 30 s: nobody is blamed for that gap
    dog = distributed._Watchdog(store, cluster, clock=lambda: now[0])
    assert tick(13, [1]) is None and tick(43) is None
    assert [tick(t) for t in (47, 51, 52.9)] == [None] * 3
    assert tick(53).startswith("process 1 of 3 stopped responding")


@pytest.mark.parametrize("peer_alive", [True, False])
def test_an_error_waits_for_the_watchdogs_verdict_on_the_peers(monkeypatch, peer_alive):
    """An error in a multi-process run is reported once the other process has been seen
    alive after it, and not before the watchdog could judge a dead one (whose last bump,
    made before it died, the first read after the error still sees as new)."""
    store, now = _FakeStore(), [100.0]
    cluster = distributed.Cluster("explicit", "127.0.0.1:1", 2, 0, heartbeat_s=10)
    dog = distributed._Watchdog(store, cluster, clock=lambda: now[0])
    monkeypatch.setattr(distributed, "_running", dog)
    store.values[f"{distributed.ALIVE_DIR}1"] = "41"  # its last bump: not read yet
    stop = threading.Event()

    def watchdog_rounds():  # the watchdog's thread, a round every 0.25 s of real time
        while not stop.wait(0.25):
            now[0] += dog.interval
            if peer_alive:
                store.values[f"{distributed.ALIVE_DIR}1"] = str(now[0])
            dog.tick()

    since = now[0]
    rounds = threading.Thread(target=watchdog_rounds)
    rounds.start()
    try:
        distributed.wait_for_watchdog(RuntimeError("UNKNOWN: Gloo AllGather failed"))
    finally:
        stop.set()
        rounds.join()
    waited = now[0] - since
    if peer_alive:  # a read to start from, and one that shows the counter moved
        assert waited <= 3 * dog.interval
    else:  # the watchdog's verdict comes at heartbeat_s without a bump (then os._exit)
        assert waited >= cluster.heartbeat_s + 3 * dog.interval


# --------------------------------------------------------------------------- SIGTERM


def _sigterm(workdir, signalled: tuple[int, ...]) -> int:
    """Trains RUN_OVERRIDES' run on two processes and sends SIGTERM to ``signalled`` once
    process 0 has written the run's config (both have joined the run, so JAX listens for
    SIGTERM; the first step is still compiling); checks that both stopped at one step, saved
    it and exited 0.

    Not later: JAX looks for a SIGTERM once a second, and the processes agree on a step only
    then; a signal sent after step 1 was seen 7-9 steps later on a 2-core VM (0.17 s a step),
    after the run's last step.
    """
    procs = _start_pair(workdir, STEPS, f"{workdir.parent}/term-", RUN_OVERRIDES)
    try:
        deadline = time.monotonic() + 900  # startup alone took 5 min on 2 busy cores
        while not (workdir / "config.json").is_file():
            assert all(p.poll() is None for p, _, _ in procs), _read(procs[0][2])[-3000:]
            assert time.monotonic() < deadline, "the two processes never started training"
            time.sleep(0.02)
        for i in signalled:
            procs[i][0].send_signal(signal.SIGTERM)
        for p, _, err in procs:
            p.wait(timeout=600)
            assert p.returncode == 0, _read(err)[-3000:]
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    printed = [_read(out) for _, out, _ in procs]
    stops = [re.findall(r"stopped at step (\d+) on (.+?): checkpoint (\d+) is saved", text)
             for text in printed]
    # Each process names the same step, and the checkpoint of that step.
    assert all(len(found) == 1 for found in stops), printed
    (stopped,) = {int(found[0][0]) for found in stops}
    assert all(found[0][2] == str(stopped) and "SIGTERM" in found[0][1] for found in stops)
    assert 1 <= stopped < STEPS, stopped  # it stopped early: there is something to resume
    assert _complete_steps(workdir) == [stopped]  # the preemption save, and no other
    assert max(_logged_steps(workdir)) == stopped  # no step ran past the checkpoint
    return stopped


def _resume(workdir, stopped: int) -> None:
    procs = _start_pair(workdir, STEPS, f"{workdir.parent}/resume-", RUN_OVERRIDES)
    for p, _, err in procs:
        p.wait(timeout=1200)
        assert p.returncode == 0, _read(err)[-3000:]
    assert f"resumed from step {stopped} in {workdir}" in _read(procs[0][1])


def _assert_same_final_params(workdir, reference_workdir):
    _, params, step = checkpoint_params(workdir)
    _, reference, reference_step = checkpoint_params(reference_workdir)
    assert step == reference_step == STEPS
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(reference)]
    for name, a, b in zip(names, jax.tree.leaves(params), jax.tree.leaves(reference),
                          strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), name


@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path):
    """A preemption notice usually reaches one host first. JAX's preemption sync point makes
    both processes save the same step and exit 0 (measured here: both stopped at step 1)."""
    stopped = _sigterm(tmp_path / "run", signalled=(1,))
    print(f"SIGTERM to process 1 while step 1 compiled: both stopped at step {stopped}")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("signalled", [(1,), (0, 1)], ids=["one", "every"])
def test_after_sigterm_a_rerun_of_both_ends_bit_identical(two_process_run, tmp_path, signalled):
    """SIGTERM to one process, or to every one (``docker stop``, SLURM's time limit); the
    rerun of both ends bit-identical to the run that was never stopped (``two_process_run``:
    the same settings)."""
    stopped = _sigterm(tmp_path / "run", signalled)
    _resume(tmp_path / "run", stopped)
    _assert_same_final_params(tmp_path / "run", two_process_run[0])
