"""gs:// workdirs, vocabularies, Hugging Face folders and prepared data stores against a real
GCS API server.

The server is ``fake-gcs-server`` (tests/gcs_emulator.py): orbax's arrays reach it through
tensorstore's gcs driver, everything else through etils.epath + gcsfs, exactly as on GCS. The
oracles are the same operations on a local disk: a run killed mid-save on gs:// must end with
the parameters of an uninterrupted local run bit for bit, and eval / export-hf of the two must
agree exactly; a store prepared on gs:// must hold the local writer's bytes and give the
batches and losses of its local copy. What the test process checks on the server it reads
through the server's own JSON API, not through the client libraries under test.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
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
        f"--config.train.num_steps={steps}", timeout=1200,  # two_process_run's limit
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


# --------------------------------------------------------------------------- prepared stores


STORE = f"gs://{BUCKET}/stores"


def _objects(gcs, prefix: str) -> dict[str, bytes]:
    """{name under prefix: bytes} of the objects on the server, through its own JSON API."""
    return {name[len(prefix):]: gcs.read(name) for name in sorted(gcs.objects(prefix))}


@pytest.fixture(scope="module")
def gcs_store(gcs, tmp_path_factory):
    """The default task's train and validation splits prepared on gs:// by the local writer,
    and a local copy of the objects downloaded through the server's API: the oracle."""
    from t5x_like import tasks
    from t5x_like.prepare import prepare

    task = tasks.DEFAULT_TASK
    for split in ("train", "validation"):
        prepare(task, split, f"{STORE}/main", num_shards=2, progress=False)
    copy = tmp_path_factory.mktemp("store_copy")
    for name, data in _objects(gcs, "stores/main/").items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    return task, f"{STORE}/main", copy


def test_prepare_to_gcs_resumes_after_a_failed_upload_with_the_local_bytes(gcs, tmp_path,
                                                                            monkeypatch):
    """Shards are uploaded as they are finished, the manifest last; a rerun on another machine
    (no staging folder) keeps what was uploaded and ends with the local writer's bytes."""
    from etils import epath

    from t5x_like import prepare as prepare_lib
    from t5x_like import storage, tasks
    from t5x_like.data.store import StoreSplit

    task = tasks.DEFAULT_TASK
    local = tmp_path / "local"
    prepare_lib.prepare(task, "validation", str(local), num_shards=4, progress=False)
    want = {p.name: p.read_bytes() for p in (local / task / "validation").iterdir()}

    real, uploads = storage.upload, []

    def fails_at_the_sixth(src, dst):  # the connection drops in shard 2's index
        if len(uploads) == 5:
            raise OSError("connection reset (injected)")
        uploads.append(dst)
        real(src, dst)

    monkeypatch.setattr(storage, "upload", fails_at_the_sixth)
    out = f"{STORE}/resumed"
    with pytest.raises(OSError, match="injected"):
        prepare_lib.prepare(task, "validation", out, num_shards=4, progress=False)
    prefix = f"stores/resumed/{task}/validation/"
    names = set(gcs.objects(prefix))
    assert f"{prefix}manifest.json" not in names  # never seen complete while partial
    assert {f"{prefix}shard-0000{s}-of-00004.done" for s in (0, 1)} <= names
    assert f"{prefix}shard-00002-of-00004.done" not in names
    with pytest.raises(UserError, match=r"is not a prepared store split \(no manifest.json\)"):
        StoreSplit(out, task, "validation")
    kept = {n: gcs.metadata(n)["generation"] for n in names
            if re.search(r"shard-0000[01]-of-00004\.(array_record|index\.npy)$", n)}
    assert len(kept) == 4

    monkeypatch.setattr(storage, "upload", real)
    staging = prepare_lib.staging_folder(epath.Path(out) / task / "validation")
    assert staging.exists()
    shutil.rmtree(staging)  # the rerun starts on another machine
    prepare_lib.prepare(task, "validation", out, num_shards=4, progress=False)
    assert _objects(gcs, prefix) == want  # the local bytes, no marker left behind
    assert {n: gcs.metadata(n)["generation"] for n in kept} == kept  # not uploaded again
    assert not staging.exists()


def test_a_gcs_store_gives_the_local_copys_batches_and_is_checked_without_a_download(
        gcs_store, monkeypatch):
    from t5x_like.data import store as store_lib
    from t5x_like.data import store_input

    task, remote_root, copy = gcs_store
    remote = store_lib.StoreSplit(remote_root, task, "train")
    local = store_lib.StoreSplit(copy, task, "train")
    assert remote.manifest == local.manifest and remote.num_documents > 100
    read = []
    monkeypatch.setattr(store_lib, "file_sha256",
                        lambda path: read.append(str(path)) or "not read")
    with pytest.raises(UserError, match="does not match its checksum"):
        local.verify()  # a local copy is read (and here the stand-in sha256 differs)
    assert read
    read.clear()
    remote.verify()  # every object's CRC32C came with the listing: nothing downloaded
    assert read == []
    for start in (0, 10**6):
        a, b = ([next(store_input.token_batches([s], None, raw_length=64, global_batch=8,
                                                seed=5, start_batch=start + k, read_threads=2,
                                                process_index=p, process_count=2))["tokens"]
                 for k in range(3) for p in range(2)] for s in (remote, local))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
            assert (x > 0).any()


def test_a_gcs_client_that_cannot_authenticate_is_named_instead_of_a_hang(gcs_store):
    """Without CLOUD_STORAGE_EMULATOR_ENDPOINT, ArrayRecord's GCS client looks for real
    credentials and retries silently; opening the store says so within FIRST_READ_SECONDS
    (3 here), and the process still exits (the stuck read is on a daemon thread)."""
    task, root, _ = gcs_store
    script = (
        "import sys\n"
        "from t5x_like.data import store\n"
        "from t5x_like.errors import UserError\n"
        "store.FIRST_READ_SECONDS = 3\n"
        f"try:\n    store.StoreSplit({root!r}, {task!r}, 'train')\n"
        "except UserError as e:\n    print('error:', e)\n    sys.exit(2)\n")
    env = {k: v for k, v in os.environ.items() if k != "CLOUD_STORAGE_EMULATOR_ENDPOINT"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"^error: store gs://.*/train: ArrayRecord's GCS client read nothing of "
                     r"shard-0000\d-of-00002.array_record in 3 s; .*Application Default "
                     r"Credentials", result.stdout), result.stdout


def test_stores_on_s3_are_refused_in_one_sentence(tmp_path):
    from t5x_like import tasks
    from t5x_like.data.store import StoreSplit
    from t5x_like.prepare import prepare

    with pytest.raises(UserError, match=r"^data.store=s3://b/stores: ArrayRecord reads local "
                       r"files and gs:// objects, not s3://"):
        StoreSplit("s3://b/stores", tasks.DEFAULT_TASK, "train")
    with pytest.raises(UserError, match=r"^--out s3://b/stores: .* not s3://"):
        prepare(tasks.DEFAULT_TASK, "validation", "s3://b/stores", progress=False)


@pytest.mark.slow  # two CLI prepares with 2 worker processes each (~1 min on 2 quiet cores)
def test_prepare_to_gcs_sigkilled_then_rerun_keeps_the_uploaded_shards(gcs, gcs_store):
    task, _, _ = gcs_store
    prefix = f"stores/killed/{task}/validation/"
    argv = ["prepare", "--task", task, "--split", "validation", "--out", f"{STORE}/killed",
            "--shards", "2", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "t5x_like.cli", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if any(n.endswith(".done") for n in gcs.objects(prefix)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "prepare ended before a shard was uploaded"
    names = gcs.objects(prefix)
    assert f"{prefix}manifest.json" not in names
    done = [n.removesuffix(".done") for n in names if n.endswith(".done")]
    kept = {n: gcs.metadata(n)["generation"] for d in done
            for n in (f"{d}.array_record", f"{d}.index.npy")}
    rerun = run_cli(*argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    clean = f"stores/main/{task}/validation/"
    assert _objects(gcs, prefix) == _objects(gcs, clean)
    assert {n: gcs.metadata(n)["generation"] for n in kept} == kept


# --------------------------------------------------------------------------- training from gs://


def _store_train_argv(workdir, store, *extra):
    from conftest import TINY_OVERRIDES

    return ["train", "--config", TINY_CONFIG, "--workdir", str(workdir),
            f"--config.data.store={store}", *TINY_OVERRIDES, "--config.train.num_steps=6",
            "--config.train.eval_every=6", "--config.train.eval_batches=1",
            "--config.train.checkpoint_every=6", *extra]


@pytest.mark.parametrize("damage", ["flip", pytest.param("delete", marks=pytest.mark.slow)])
def test_a_damaged_gcs_shard_is_named_in_one_sentence(gcs, gcs_store, tmp_path, damage):
    task, _, _ = gcs_store
    source, target = "stores/main/", f"stores/{damage}/"
    for name, data in _objects(gcs, source).items():
        gcs.upload(target + name, data)
    shard = f"{target}{task}/train/shard-00001-of-00002.array_record"
    if damage == "flip":
        data = bytearray(gcs.read(shard))
        data[len(data) // 2] ^= 0x01  # same size: only a checksum can tell
        gcs.upload(shard, bytes(data))
        want = "shard-00001-of-00002.array_record does not match its checksum"
    else:
        gcs.delete(shard)
        want = "shard-00001-of-00002.array_record is missing"
    result = run_cli(*_store_train_argv(tmp_path / "run", f"gs://{BUCKET}/{target.rstrip('/')}"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"gs://{BUCKET}/{target}{task}/train" in lines[0] and want in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # two CLI training runs (~40 s on 2 quiet cores); make test-all
def test_training_from_a_gcs_store_logs_the_local_copys_losses(gcs_store, tmp_path):
    from family_runs import logged_losses

    _, remote_root, copy = gcs_store
    for name, store in (("remote", remote_root), ("local", copy)):
        result = run_cli(*_store_train_argv(tmp_path / name, store))
        assert result.returncode == 0, result.stderr[-3000:]
    remote, local = logged_losses(tmp_path / "remote"), logged_losses(tmp_path / "local")
    assert sorted(remote) == list(range(1, 7)) and remote == local
