"""gs:// workdirs, vocabularies and Hugging Face folders against a real GCS API server.

The server is ``fake-gcs-server`` (tests/gcs_emulator.py): orbax's arrays reach it through
tensorstore's gcs driver, everything else through etils.epath + gcsfs, exactly as on GCS. The
oracles are the same operations on a local disk: a run killed mid-save on gs:// must end with
the parameters of an uninterrupted local run bit for bit, and eval / export-hf of the two must
agree exactly. What the test process checks on the server it lists through the server's own
JSON API, not through the client libraries under test.
"""

import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, run_cli
from gcs_emulator import running
from test_reliability import NUM_STEPS, OVERRIDES, _argv, _assert_same_params, _config, _state

from t5x_like.errors import UserError

BUCKET = "t5x-like-test"


@pytest.fixture(scope="module")
def gcs():
    with running(BUCKET) as emulator:
        yield emulator


def _fresh_listings() -> None:
    """gcsfs caches folder listings per process; objects that other processes (or tensorstore)
    wrote are seen only after the cache is dropped."""
    import fsspec

    fsspec.filesystem("gcs").invalidate_cache()


def _steps_on_server(gcs, run: str) -> tuple[set[int], set[int]]:
    """(committed steps, steps with objects but no commit file yet) of ``run``'s checkpoints."""
    files: dict[int, set[str]] = {}
    prefix = f"{run}/checkpoints/"
    for name in gcs.objects(prefix):
        step, _, rest = name[len(prefix):].partition("/")
        if step.isdigit():
            files.setdefault(int(step), set()).add(rest)
    committed = {s for s, names in files.items() if "commit_success.txt" in names}
    return committed, set(files) - committed


# --------------------------------------------------------------------------- small pieces


def test_storage_writes_checks_and_vocabulary_on_gcs(gcs, tmp_path):
    from t5x_like import storage
    from t5x_like.checkpoints import check_free_space, check_writable
    from t5x_like.data import vocab

    root = f"gs://{BUCKET}/pieces"
    assert storage.is_remote(root) and not storage.is_remote(tmp_path)
    assert str(storage.absolute(root)) == root  # not prefixed with the working directory
    storage.write_atomically(f"{root}/config.json", '{"a": 1}\n')
    storage.write_atomically(f"{root}/config.json", '{"a": 2}\n')
    assert "pieces/config.json" in gcs.objects("pieces/")
    assert storage.as_path(f"{root}/config.json").read_text() == '{"a": 2}\n'

    check_writable(f"{root}/run")  # a probe object, written, read back and removed
    assert not [n for n in gcs.objects("pieces/run/") if ".write-test-" in n]
    check_free_space(f"{root}/run", 10**15)  # object storage: nothing to ask, no error
    with pytest.raises(UserError, match=r"^workdir gs://no-such-bucket/run is not writable "
                       r"\(.+\); choose another --workdir"):
        check_writable("gs://no-such-bucket/run")

    # Logs are staged locally and uploaded whole; a second Mirror pulls and extends them.
    mirror = storage.Mirror(storage.as_path(f"{root}/logs"), pull=("metrics.jsonl",))
    (mirror.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (mirror.local / "tensorboard").mkdir()
    (mirror.local / "tensorboard" / "events").write_bytes(b"\x00\x01")
    mirror.close()
    assert not mirror.local.exists()
    again = storage.Mirror(storage.as_path(f"{root}/logs"), pull=("metrics.jsonl",))
    with open(again.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    again.close()
    _fresh_listings()
    assert storage.as_path(f"{root}/logs/metrics.jsonl").read_text() == (
        '{"step": 1}\n{"step": 2}\n')
    assert sorted(gcs.objects("pieces/logs/")) == ["pieces/logs/metrics.jsonl",
                                                    "pieces/logs/tensorboard/events"]

    # A SentencePiece model on gs:// is read through epath into the same vocabulary seqio
    # builds from the local file: same model bytes (sentinels included), same ids.
    local = vocab.get_vocabulary(vocab.ensure_default_vocab())
    remote_file = f"{root}/sp.model"
    storage.write_atomically(remote_file, vocab.ensure_default_vocab().read_bytes())
    remote = vocab.get_vocabulary(remote_file)
    assert remote.sp_model == local.sp_model and remote.vocab_size == local.vocab_size
    text = "To be, or not to be: that is the <extra_id_0> question."
    assert remote.encode(text) == local.encode(text)
    assert remote.decode(local.encode(text)) == local.decode(local.encode(text))
    with pytest.raises(UserError, match="vocabulary file gs://.*/missing.model does not exist"):
        vocab.get_vocabulary(f"{root}/missing.model")


# --------------------------------------------------------------------------- a run on gs://


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """An uninterrupted run on the local disk: the oracle for the runs on gs://."""
    from t5x_like.train import train

    os.chdir(ROOT)
    workdir = tmp_path_factory.mktemp("gcs_reference") / "run"
    train(_config(), workdir)
    params, step = _state(workdir)
    assert step == NUM_STEPS
    return workdir, params


@pytest.fixture(scope="module")
def killed_and_resumed(gcs, local_reference, tmp_path_factory):
    """A run on gs:// SIGKILLed while a checkpoint is being written (objects of a step on the
    server, its commit file not yet), then resumed by the same command."""
    run = "killed"
    workdir = f"gs://{BUCKET}/{run}"
    log = tmp_path_factory.mktemp("gcs_kill") / "incarnation.log"
    with open(log, "w+") as out:
        proc = subprocess.Popen(_argv(workdir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        caught, deadline = None, time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            committed, writing = _steps_on_server(gcs, run)
            if len(committed) >= 3 and writing:  # a few steps in, and a save in flight
                proc.send_signal(signal.SIGKILL)
                caught = max(writing)
                break
            time.sleep(0.002)
        proc.wait()
        out.seek(0)
        first_log = out.read()
    assert proc.returncode == -signal.SIGKILL, f"no save caught in flight:\n{first_log[-3000:]}"
    committed, writing = _steps_on_server(gcs, run)
    assert caught in writing  # the kill really left a half-written step on the server
    resumed = run_cli(*_argv(workdir)[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return workdir, run, caught, max(committed), resumed


@pytest.mark.slow  # three CLI runs on the emulator (~4 min); make test-all
def test_sigkill_mid_save_on_gcs_resumes_bit_identical(gcs, local_reference, killed_and_resumed):
    _, ref_params = local_reference
    workdir, run, caught, last_committed, resumed = killed_and_resumed
    out = resumed.stdout
    assert (f"warning: checkpoint {workdir}/checkpoints/{caught} is incomplete (a save that "
            f"never finished") in out
    assert re.findall(r"resumed from step (\d+) in (\S+)", out) == [(str(last_committed),
                                                                     workdir)]
    committed, writing = _steps_on_server(gcs, run)
    assert not writing and max(committed) == NUM_STEPS  # the leftover was removed
    objects = gcs.objects(f"{run}/")
    assert f"{run}/config.json" in objects and f"{run}/metrics.jsonl" in objects
    assert any(n.startswith(f"{run}/tensorboard/events.out.tfevents.") for n in objects)
    _fresh_listings()
    params, step = _state(workdir)
    assert step == NUM_STEPS
    _assert_same_params(params, ref_params)


@pytest.mark.slow  # three CLI runs on the emulator (~4 min); make test-all
def test_eval_and_export_hf_read_a_gcs_workdir(gcs, local_reference, killed_and_resumed, tmp_path):
    """eval of the gs:// run equals eval of the local run; export-hf from gs:// to gs://
    writes the same bytes as exporting the local run; import-hf from gs:// to gs:// brings the
    same parameters back, with its vocabulary read from gs://. (In-process: the CLI verbs
    pass their path strings to these functions as they are.)"""
    from t5x_like import storage
    from t5x_like.evaluation.driver import evaluate_checkpoint, load_checkpoint
    from t5x_like.interop import checkpoint_io

    ref_dir, ref_params = local_reference
    workdir = killed_and_resumed[0]
    _fresh_listings()
    on_gcs = evaluate_checkpoint(workdir, num_batches=2, baseline=False)
    on_disk = evaluate_checkpoint(ref_dir, num_batches=2, baseline=False)
    assert on_gcs == on_disk and on_gcs["step"] == NUM_STEPS

    exported = f"gs://{BUCKET}/exported"
    checkpoint_io.export_hf(workdir, exported)
    checkpoint_io.export_hf(ref_dir, tmp_path / "hf")
    _fresh_listings()
    for name in ("model.safetensors", "config.json", "spiece.model"):
        assert storage.as_path(f"{exported}/{name}").read_bytes() == (
            tmp_path / "hf" / name).read_bytes(), name

    imported = f"gs://{BUCKET}/imported"
    scan = _config().model.scan_layers  # import-hf's default layer layout may differ
    checkpoint_io.import_hf(exported, imported, [f"model.scan_layers={scan}"])
    _fresh_listings()
    exp, params, step = load_checkpoint(imported)
    assert step == 0 and exp.config.data.vocab_path == f"{imported}/spiece.model"
    _assert_same_params(jax.device_get(params), ref_params)


@pytest.mark.slow  # three CLI runs on the emulator (~4 min); make test-all
def test_an_unreadable_step_on_gcs_falls_back_with_a_warning(gcs, killed_and_resumed, capsys):
    """The newest step's meta object deleted on the server (runs after the tests above, which
    read that step): reading the run falls back to the step before and says why."""
    workdir, run, *_ = killed_and_resumed
    gcs.delete(f"{run}/checkpoints/{NUM_STEPS}/meta/metadata")
    _fresh_listings()
    _, step = _state(workdir)
    assert step == NUM_STEPS - 2
    out = capsys.readouterr().out
    assert f"warning: checkpoint step {NUM_STEPS} in {workdir}/checkpoints is unreadable" in out


# --------------------------------------------------------------------------- launch local


@pytest.mark.slow
@pytest.mark.multiprocess
def test_launch_local_two_processes_train_on_a_gcs_workdir(gcs):
    """Two processes (2 fake devices each) train one run on gs://: each writes its shards
    through tensorstore, process 0 alone writes the config and one metrics line per step."""
    import json

    from t5x_like import storage

    steps = 6
    workdir = f"gs://{BUCKET}/launched"
    result = run_cli(
        "launch", "local", "--processes=2", "--devices-per-process=2", "--",
        "train", "--config", TINY_CONFIG, "--workdir", workdir, *OVERRIDES,
        f"--config.train.num_steps={steps}",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    _fresh_listings()
    rows = [json.loads(x) for x in
            storage.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, steps + 1))
    committed, writing = _steps_on_server(gcs, "launched")
    assert committed == {2, 4, 6} and not writing
    _, step = _state(workdir)
    assert step == steps and np.isfinite(rows[-1]["train/loss"])
