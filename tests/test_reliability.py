"""Fault injection on real processes: SIGKILL at seeded random moments (mid-save included),
SIGTERM, NaN gradients, corrupted checkpoints, a full disk and an unwritable workdir.

The oracle is an uninterrupted run of the same config: whatever happened on the way, the
final parameters must equal its parameters bit for bit.
"""

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli

from t5x_like import config as config_lib
from t5x_like.errors import UserError

NUM_STEPS = 40
OVERRIDES = [
    *TINY_OVERRIDES,
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=3",
    "--config.train.eval_batches=0",
]
TMP_MARKER = ".orbax-checkpoint-tmp"


def _config(*extra):
    return config_lib.load_config(TINY_CONFIG, [o.removeprefix("--") for o in [*OVERRIDES, *extra]])


def _argv(workdir, *extra):
    return [sys.executable, "-m", "t5x_like.cli", "train", "--config", TINY_CONFIG,
            "--workdir", str(workdir), *OVERRIDES, *extra]


def _train(workdir, *extra, expect=0):
    result = run_cli(*_argv(workdir, *extra)[3:])
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def _state(workdir):
    """(params, step) of the newest readable checkpoint, as numpy."""
    from t5x_like.evaluation.driver import load_checkpoint

    _, params, step = load_checkpoint(workdir)
    return jax.device_get(params), step


def _assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its workdir and final parameters."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _train(workdir)
    params, step = _state(workdir)
    assert step == NUM_STEPS
    return workdir, params


def _steps_logged_since(workdir, offset):
    """Steps logged to metrics.jsonl after byte ``offset`` (this incarnation's lines)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line still being written
    return steps


def _tmp_dirs(workdir):
    folder = workdir / "checkpoints"
    return [p.name for p in folder.iterdir() if TMP_MARKER in p.name] if folder.is_dir() else []


def _kill_and_resume(workdir, kills, seed):
    """Starts the run ``kills`` times and SIGKILLs it each time: after a random step (seeded),
    every other time at the moment an asynchronous save is in progress. Returns one record
    per kill: the last step logged before it, whether a save was in progress, and the step
    the next start resumed from."""
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, NUM_STEPS - 4), kills))
    records = []
    for i, target in enumerate(targets):
        during_save = i % 2 == 1
        metrics = workdir / "metrics.jsonl"
        offset = metrics.stat().st_size if metrics.is_file() else 0
        out = open(workdir.parent / f"incarnation-{i}.log", "w+")  # noqa: SIM115
        proc = subprocess.Popen(_argv(workdir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            steps = _steps_logged_since(workdir, offset)
            if steps and steps[-1] >= target and (not during_save or _tmp_dirs(workdir)):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.005 if during_save else 0.05))
        saving = bool(_tmp_dirs(workdir))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out.seek(0)
        log = out.read()
        out.close()
        assert proc.returncode == -signal.SIGKILL, f"run {i} ended by itself:\n{log[-3000:]}"
        steps = _steps_logged_since(workdir, offset)
        left_behind = _tmp_dirs(workdir)
        records.append({"last_step": max(steps, default=0), "saving": saving,
                        "tmp_left": left_behind, "log": log})
    return records


def _finish_and_check(workdir, records, reference_params):
    result = _train(workdir)
    resumed = [int(m) for m in re.findall(r"resumed from step (\d+)", result.stdout)]
    assert len(resumed) == 1
    # The start after kill i reports the step it resumed from: in incarnation i+1's log, or in
    # the final run's output for the last kill.
    resumes = [*[re.findall(r"resumed from step (\d+)", r["log"]) for r in records[1:]], resumed]
    lost = []
    for record, found in zip(records, resumes, strict=True):
        start = int(found[0]) if found else 0
        assert start <= record["last_step"] or record["last_step"] == 0
        lost.append(record["last_step"] - start)
    # A save that was cut short is reported (and cleaned up) by the next start.
    for record, later in zip(records, [*[r["log"] for r in records[1:]], result.stdout],
                             strict=True):
        for name in record["tmp_left"]:
            assert f"checkpoint {workdir / 'checkpoints' / name} is incomplete" in later
    assert not _tmp_dirs(workdir)
    params, step = _state(workdir)
    assert step == NUM_STEPS
    _assert_same_params(params, reference_params)
    return lost


def _report(name, records, lost):
    during = sum(r["saving"] for r in records)
    print(f"\n{name}: {len(records)} SIGKILLs ({during} during a save, "
          f"{sum(bool(r['tmp_left']) for r in records)} left an incomplete save), all survived; "
          f"steps lost per kill: {lost} (max {max(lost)}, mean {np.mean(lost):.1f})")


def test_sigkill_at_3_random_moments_resumes_bit_identical(reference, tmp_path):
    ref_dir, ref_params = reference
    workdir = tmp_path / "run"
    records = _kill_and_resume(workdir, kills=3, seed=1)
    lost = _finish_and_check(workdir, records, ref_params)
    # Saves are asynchronous: a kill while step s is still being written, with training
    # already at s+2 (where the next save waits for it), falls back to s-2.
    assert max(lost) <= 2 * 2
    _report("3 kills", records, lost)


@pytest.mark.slow
def test_sigkill_at_20_random_moments_resumes_bit_identical(reference, tmp_path):
    ref_dir, ref_params = reference
    workdir = tmp_path / "run"
    records = _kill_and_resume(workdir, kills=20, seed=20)
    assert sum(r["saving"] for r in records) >= 5  # several kills really hit a save
    lost = _finish_and_check(workdir, records, ref_params)
    assert max(lost) <= 2 * 2  # two checkpoint intervals, as above
    _report("20 kills", records, lost)


def test_sigterm_checkpoints_the_step_in_flight_exits_0_and_resumes_exactly(reference, tmp_path):
    _, ref_params = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_argv(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        steps = _steps_logged_since(workdir, 0)
        if steps and steps[-1] >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    match = re.search(r"stopped at step (\d+) on SIGTERM: checkpoint (\d+) is saved in", stdout)
    assert match, stdout[-2000:]
    stopped = int(match.group(1))
    assert 3 <= stopped < NUM_STEPS and match.group(2) == str(stopped)
    assert stopped in [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(_steps_logged_since(workdir, 0)) == stopped  # no step ran past the checkpoint
    assert json.loads(stdout.strip().splitlines()[-1])["preempted_at_step"] == stopped
    again = _train(workdir)
    assert f"resumed from step {stopped} in" in again.stdout
    params, step = _state(workdir)
    assert step == NUM_STEPS
    _assert_same_params(params, ref_params)


# --------------------------------------------------------------------------- NaN


def test_nonfinite_update_is_skipped_inside_the_step(monkeypatch):
    """Injected NaN gradients, and a NaN parameter that makes the loss NaN: either way the
    parameters and optimizer state come out bit-identical, the step counter advances and the
    step says it skipped; a healthy step changes the parameters."""
    from t5x_like.experiment import build
    from t5x_like.train import device_batches, make_train_step

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("T5X_LIKE_INJECT_NAN_STEPS", "1")
    exp = build(_config())
    step_fn = make_train_step(exp)
    batches = device_batches(exp, split="train")
    state = exp.init_state()

    def run(state):
        before = jax.device_get({k: state[k] for k in ("params", "opt_state", "step")})
        state, metrics = step_fn(state, next(batches))
        return before, jax.device_get(state), jax.device_get(metrics)

    before, state0, m0 = run(state)  # step index 0: healthy
    assert m0["skipped"] == 0 and np.isfinite(m0["loss"])
    assert not np.array_equal(before["params"]["lm_head"], state0["params"]["lm_head"])
    before, state1, m1 = run(jax.device_put(state0, exp.state_shardings))  # index 1: injected
    assert m1["skipped"] == 1 and np.isnan(m1["grad_norm"]) and np.isfinite(m1["loss"])
    _assert_same_params(before["params"], state1["params"])
    _assert_same_params(before["opt_state"], state1["opt_state"])
    assert state1["step"] == 2
    poisoned = jax.tree.map(np.array, state1)
    poisoned["params"]["decoder"]["final_norm"]["scale"][0] = np.nan  # loss becomes NaN
    before, state2, m2 = run(jax.device_put(poisoned, exp.state_shardings))  # index 2
    assert m2["skipped"] == 1 and np.isnan(m2["loss"])
    _assert_same_params(before["opt_state"], state2["opt_state"])
    assert state2["step"] == 3


def _skipped_per_step(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r}


def test_injected_nans_are_skipped_counted_and_the_run_completes(tmp_path, monkeypatch, capsys):
    """NaN gradients at step indices 3, 4, 5 (logged steps 4-6) with max_skipped_steps=3."""
    from t5x_like.tasks import register_text_task
    from t5x_like.train import train

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("T5X_LIKE_INJECT_NAN_STEPS", "3,4,5")
    corpus = tmp_path / "corpus.txt"
    lines = [f"Line {i} of a small corpus, with words enough to fill a few batches." for i in
             range(400)]
    corpus.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not text\n\n")
    register_text_task("reliability_nan_corpus", str(corpus), validation_fraction=None)
    workdir = tmp_path / "run"
    result = train(_config("--config.train.num_steps=12", "--config.train.max_skipped_steps=3",
                           "--config.data.task='reliability_nan_corpus'"), workdir)
    assert result["step"] == 12 and result["train/skipped_steps"] == 3
    counts = _skipped_per_step(workdir)
    assert [counts[s] for s in range(1, 13)] == [0, 0, 0, 1, 2, 3, 3, 3, 3, 3, 3, 3]
    params, step = _state(workdir)
    assert step == 12 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    out = capsys.readouterr().out
    assert "note: 3 update(s) skipped for a non-finite loss or gradient" in out
    assert f"data: text source {corpus}: skipped lines: 1 not valid UTF-8, 1 blank" in out


def test_too_many_nans_in_a_row_stop_with_the_step_and_batch(tmp_path, monkeypatch):
    """Four in a row with max_skipped_steps=3: the run stops at the fourth, naming steps and
    batches; the checkpoints written meanwhile hold the last good parameters."""
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.train import train

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("T5X_LIKE_INJECT_NAN_STEPS", "3,4,5,6")
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(_config("--config.train.max_skipped_steps=3"), workdir)
    assert str(info.value).startswith(
        "training stopped at step 7: 4 updates in a row (steps 4-7, training batches 3-6) had a "
        "non-finite loss or gradient, more than train.max_skipped_steps=3; the last checkpoint "
        "is intact"
    )
    from t5x_like.experiment import build

    exp = build(_config())
    checkpoints = Checkpoints(workdir, read_only=True)
    assert checkpoints.steps() == [2, 4, 6]  # nothing was saved at or after the stop
    exp_state = jax.device_get(checkpoints.restore_latest(exp.abstract_state())[0])
    assert exp_state["step"] == 6
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(exp_state["params"]))
    # Steps 4-6 were skipped, so checkpoint 6 holds the parameters of step 3 = checkpoint 4's.
    step4 = checkpoints.manager.restore(4, args=_restore_args(exp))["state"]
    _assert_same_params(jax.device_get(step4["params"]), exp_state["params"])
    checkpoints.close()


def _restore_args(exp):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardRestore(exp.abstract_state()),
                              meta=ocp.args.JsonRestore())


# --------------------------------------------------------------------------- damaged checkpoints


def _largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest(step_dir / "state")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _flip(step_dir):
    f = _largest(step_dir / "state")
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete_state_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _delete_meta(step_dir):
    (step_dir / "meta" / "metadata").unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip, _delete_state_metadata, _delete_meta],
                         ids=["truncated", "bytes_flipped", "state_metadata_deleted",
                              "meta_deleted"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(reference, damage, tmp_path,
                                                             capsys):
    ref_dir, _ = reference
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir)
    damage(workdir / "checkpoints" / str(NUM_STEPS))
    _, step = _state(workdir)
    assert step == NUM_STEPS - 2
    out = capsys.readouterr().out
    assert f"warning: checkpoint step {NUM_STEPS} in {workdir / 'checkpoints'} is unreadable" in out
    assert "falling back to an earlier step" in out
    assert (workdir / "checkpoints" / str(NUM_STEPS)).is_dir()  # eval leaves the files alone


def test_training_past_a_damaged_checkpoint_moves_it_aside_and_ends_bit_identical(
    reference, tmp_path, capsys, monkeypatch
):
    """Flipped bytes in the newest step: resume from the one before, move the bad one aside
    (orbax would refuse to save any step below it), redo two steps, equal the reference."""
    from t5x_like.train import train

    monkeypatch.chdir(ROOT)
    ref_dir, ref_params = reference
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir)
    _flip(workdir / "checkpoints" / str(NUM_STEPS))
    train(_config(), workdir)
    out = capsys.readouterr().out
    assert "do not match the fingerprint saved with them" in out
    assert f"resumed from step {NUM_STEPS - 2}" in out
    aside = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("unread")]
    assert len(aside) == 1 and aside[0].startswith(f"unreadable-{NUM_STEPS}-")
    params, step = _state(workdir)
    assert step == NUM_STEPS
    _assert_same_params(params, ref_params)


# --------------------------------------------------------------------------- disk


def test_unwritable_workdir_fails_before_anything_is_built(tmp_path, monkeypatch):
    import t5x_like.train as train_lib

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(train_lib, "build", lambda *a, **k: pytest.fail("build was called"))
    with pytest.raises(UserError, match=rf"workdir {blocker / 'run'} is not writable "
                       r"\((FileExistsError|NotADirectoryError): .*\); choose another --workdir"):
        train_lib.train(_config(), blocker / "run")


def test_disk_too_small_for_a_checkpoint_fails_before_compiling(tmp_path, monkeypatch):
    import collections

    import t5x_like.checkpoints as ckpt_lib
    import t5x_like.train as train_lib

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 2**20))
    monkeypatch.setattr(train_lib, "make_train_step", lambda e: pytest.fail("compiled"))
    with pytest.raises(UserError, match=r"has 1.0 MiB free but one checkpoint of this model "
                       r"needs about [\d.]+ MiB; free space or choose another --workdir"):
        train_lib.train(_config(), tmp_path / "run")


def _limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_a_save_that_fails_on_a_full_disk_keeps_the_previous_checkpoint(reference, tmp_path):
    """A real write failure: RLIMIT_FSIZE makes every write past 256 KiB fail (EFBIG, as a
    full disk fails with ENOSPC). Continuing the finished reference run by 2 steps must stop
    with one sentence, and step 40 must stay restorable."""
    ref_dir, ref_params = reference
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir)
    result = subprocess.run(
        _argv(workdir, f"--config.train.num_steps={NUM_STEPS + 2}"), cwd=ROOT,
        capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(256 * 1024),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = lines
    assert re.match(rf"error: saving checkpoint step {NUM_STEPS + 2} in .* failed \(.*\); "
                    rf"checkpoint step {NUM_STEPS} is intact: free disk space", line), line
    params, step = _state(workdir)
    assert step == NUM_STEPS
    _assert_same_params(params, ref_params)


def test_maintenance_poller_runs_only_on_gce_and_stops_the_run(tmp_path):
    """Off GCE nothing polls (no network); on GCE a non-NONE event is a stop notice."""
    from t5x_like import preemption

    (tmp_path / "product").write_text("Standard PC (Q35 + ICH9, 2009)\n")
    assert not preemption.on_gce(tmp_path / "product")
    assert not preemption.on_gce(tmp_path / "absent")
    (tmp_path / "product").write_text("Google Compute Engine\n")
    assert preemption.on_gce(tmp_path / "product")

    calls = []
    watcher = preemption.Preemption(0.01, gce=False, read_event=lambda: calls.append(1) or "")
    time.sleep(0.1)
    assert watcher.requested(5, at_log_step=True) is None and not calls
    watcher.close()

    events = iter(["NONE", "NONE", "TERMINATE_ON_HOST_MAINTENANCE"])
    watcher = preemption.Preemption(0.01, gce=True, read_event=lambda: next(events))
    deadline = time.monotonic() + 10
    while watcher.requested(5, at_log_step=True) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watcher.requested(6, at_log_step=False) == (
        "maintenance event TERMINATE_ON_HOST_MAINTENANCE")
    watcher.close()


def test_sigterm_handler_sets_the_reason_and_is_restored():
    from t5x_like import preemption

    previous = signal.getsignal(signal.SIGTERM)
    watcher = preemption.Preemption(0.0)
    assert watcher.requested(1, at_log_step=True) is None
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert watcher.requested(2, at_log_step=True) == "SIGTERM"
    watcher.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_checkpoint_every_minutes_saves_between_step_intervals(tmp_path, monkeypatch):
    """With a step interval longer than the run, a minutes interval of ~0 saves every log step."""
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.train import train

    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "run"
    train(_config("--config.train.num_steps=5", "--config.train.checkpoint_every=1000",
                  "--config.train.checkpoint_every_minutes=1e-9",
                  "--config.train.keep_checkpoints=10"), workdir)
    assert Checkpoints(workdir, read_only=True).steps() == [1, 2, 3, 4, 5]
