"""``t5x-like prepare``: a registered task's text -> a token store (``data/store.py``).

A two-phase job over N local processes, the shape of a MapReduce (and of the Beam pipeline
in ``prepare_beam.py``, which shares every function that decides bytes):

1. map: worker w reads source examples w, w + N, ... (tf.data ``shard``), tokenises them with
   the task's own preprocessors up to its cache point, and files each under its shard
   (``order_keys``) in a bucket file of its own;
2. reduce: shard s gathers its buckets, sorts by key and writes one ArrayRecord file plus
   its index.

Everything is written in ``<split>.partial/``; the manifest is written last and the folder
renamed to ``<split>``, so a kill leaves either nothing visible or a complete store. A rerun
with the same settings reuses finished buckets and shards (``.done`` markers) and finishes.

With ``--out gs://...`` (object storage has no folder rename and ArrayRecord writes local
files) the same job runs in a local staging folder (``staging_folder``) and each finished
shard is uploaded into ``<split>/`` followed by its ``<shard>.done`` entry; the manifest is
uploaded last, so a store without one is unfinished, and a rerun, on any machine, keeps the
shards already uploaded.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from t5x_like import storage
from t5x_like.data import store as store_lib
from t5x_like.data.registry import pretraining_provider
from t5x_like.errors import UserError

WRITER = f"t5x_like.prepare/{store_lib.VERSION}"


# --------------------------------------------------------------------------- source


def task_for_prepare(name: str, split: str, modules: Sequence[str] = ()):
    """The registered task or mixture ``name``, checked to have ``split`` and pretraining
    text, after registering the built-in tasks and importing ``modules`` (module names or .py
    files, as ``data.task_modules`` takes them)."""
    import t5x_like.tasks  # noqa: F401  (the built-in tasks)
    from t5x_like.experiment import import_task_modules

    import_task_modules(",".join(modules))
    return pretraining_provider(name, split)


def source_examples(task, split: str, worker: int, workers: int
                    ) -> Iterator[tuple[int, np.ndarray]]:
    """(source index, int32 tokens with EOS) of examples ``worker::workers`` of ``split``,
    through the task's preprocessors up to its cache point (rekey, tokenise, append EOS)."""
    ds = task.source.get_dataset(split=split, shuffle=False)
    if workers > 1:
        ds = ds.shard(workers, worker)
    ds = task.preprocess_precache(ds).map(lambda ex: ex["targets"])
    index = worker
    for rows in ds.ragged_batch(1024):  # one example at a time is ~10x slower in tf.data
        splits = rows.row_splits.numpy()
        flat = rows.flat_values.numpy().astype(np.int32)
        for a, b in zip(splits[:-1], splits[1:], strict=True):
            yield index, flat[a:b]
            index += workers


# --------------------------------------------------------------------------- buckets


def write_bucket(path: epath.Path, keys: np.ndarray, sources: np.ndarray,
                 docs: Sequence[np.ndarray], dtype: np.dtype) -> None:
    lengths = np.array([len(d) for d in docs], np.int64)
    flat = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, keys=keys, sources=sources, lengths=lengths, tokens=flat)
    tmp.rename(path)


def read_buckets(paths: Iterable[epath.Path]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    keys, sources, docs = [], [], []
    for path in paths:
        with path.open("rb") as f:
            data = np.load(f)
            keys.append(data["keys"])
            sources.append(data["sources"])
            docs += np.split(data["tokens"], np.cumsum(data["lengths"])[:-1]) \
                if len(data["lengths"]) else []
    return (np.concatenate(keys) if keys else np.zeros(0, np.uint64),
            np.concatenate(sources) if sources else np.zeros(0, np.int64), docs)


def write_shard(out: epath.Path, name: str, keys: np.ndarray, sources: np.ndarray,
                docs: Sequence[np.ndarray], dtype: np.dtype) -> dict:
    """Sorts one shard's documents by (key, source index) and writes its record file and
    index; returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    order = np.lexsort((sources, keys))
    record = out / (name + ".array_record")
    writer = ArrayRecordWriter(os.fspath(record), store_lib.RECORD_OPTIONS)
    lengths = np.empty(len(order), np.int64)
    for i, j in enumerate(order):
        doc = np.asarray(docs[j]).astype(dtype, copy=False)
        writer.write(doc.tobytes())
        lengths[i] = len(doc)
    writer.close()
    index = np.stack([lengths, np.asarray(sources, np.int64)[order]], axis=1)
    index_path = out / (name + ".index.npy")
    with index_path.open("wb") as f:
        np.save(f, index)
    return dict(name=name, documents=int(len(order)), tokens=int(lengths.sum()),
                bytes=record.stat().length, sha256=store_lib.file_sha256(record),
                index_sha256=store_lib.file_sha256(index_path),
                crc32c=storage.crc32c_of(record), index_crc32c=storage.crc32c_of(index_path))


def manifest(task_name: str, split: str, vocabulary, seed: int, dtype: np.dtype,
             shards: list[dict]) -> dict:
    shards = sorted(shards, key=lambda s: s["name"])
    return {
        "format": store_lib.FORMAT,
        "version": store_lib.VERSION,
        "writer": WRITER,
        "task": task_name,
        "split": split,
        "vocabulary": {
            "name": str(getattr(vocabulary, "sentencepiece_model_file", type(vocabulary))),
            "vocab_size": int(vocabulary.vocab_size),
            "fingerprint": store_lib.vocabulary_fingerprint(vocabulary),
        },
        "seed": seed,
        "dtype": dtype.name,
        "num_shards": len(shards),
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }


# --------------------------------------------------------------------------- the job


def _map_worker(job: dict, worker: int, report=None) -> None:
    """Phase 1 for one worker: its examples into one bucket file per shard."""
    out = epath.Path(job["partial"])
    done = out / f"map-{worker:05d}.done"
    if done.exists():
        return
    task = task_for_prepare(job["task"], job["split"], job["modules"])
    dtype = np.dtype(job["dtype"])
    shards = job["num_shards"]
    buckets: list[list] = [[] for _ in range(shards)]
    for n, (index, tokens) in enumerate(
            source_examples(task, job["split"], worker, job["workers"]), 1):
        key = store_lib.order_keys(job["seed"], np.array([index]))[0]
        buckets[int(key % np.uint64(shards))].append((key, index, tokens))
        if report is not None and n % 256 == 0:
            report(256)
    for s, items in enumerate(buckets):
        write_bucket(out / f"bucket-{s:05d}-{worker:05d}.npz",
                     np.array([k for k, _, _ in items], np.uint64),
                     np.array([i for _, i, _ in items], np.int64),
                     [t for _, _, t in items], dtype)
    done.write_text("")


def _reduce_worker(job: dict, shard: int) -> dict:
    """Phase 2 for one shard: its buckets into the record file and the index; with
    ``job["upload"]`` (a gs:// store) both files are then uploaded, followed by the shard's
    ``.done`` entry, and a shard whose remote entry exists is not written again."""
    out = epath.Path(job["partial"])
    name = store_lib.shard_name(shard, job["num_shards"])
    remote = epath.Path(job["upload"]) if job.get("upload") else None
    uploaded = out / f"{name}.uploaded"
    if remote is not None:
        if uploaded.exists():
            return json.loads(uploaded.read_text())
        if (remote / f"{name}.done").exists():  # uploaded by an earlier, killed run
            entry = json.loads((remote / f"{name}.done").read_text())
            uploaded.write_text(json.dumps(entry))
            return entry
    done = out / f"{name}.done"
    if done.exists():
        entry = json.loads(done.read_text())
    else:
        buckets = [out / f"bucket-{shard:05d}-{w:05d}.npz" for w in range(job["workers"])]
        keys, sources, docs = read_buckets(buckets)
        entry = write_shard(out, name, keys, sources, docs, np.dtype(job["dtype"]))
        done.write_text(json.dumps(entry))
    if remote is not None:
        for suffix in (".array_record", ".index.npy"):
            storage.upload(out / (name + suffix), remote / (name + suffix))
        storage.write_atomically(remote / f"{name}.done", json.dumps(entry))
        uploaded.write_text(json.dumps(entry))
    return entry


_COUNTER = None  # in a pool worker: the examples-tokenised counter the parent shows


def _pool_init(counter) -> None:
    global _COUNTER
    _COUNTER = counter
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from t5x_like.data import tf_runtime

    tf_runtime.configure()


def _count(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _map_in_pool(args) -> None:
    job, worker = args
    _map_worker(job, worker, _count)


def _reduce_in_pool(args) -> dict:
    return _reduce_worker(*args)


def prepare(task_name: str, split: str, out: str, *, workers: int = 1, num_shards: int = 0,
            seed: int = 0, modules: Sequence[str] = (), progress: bool = True) -> dict:
    """Writes (or finishes) the store of ``split`` of task ``task_name`` under ``out``;
    returns its manifest. A mixture prepares each of its tasks."""
    import seqio

    provider = task_for_prepare(task_name, split, modules)
    if isinstance(provider, seqio.Mixture):
        last = {}
        for task in provider.tasks:
            if split in task.splits:
                last = prepare(task.name, split, out, workers=workers, num_shards=num_shards,
                               seed=seed, modules=modules, progress=progress)
        return last
    if str(out).startswith("s3://"):
        raise UserError(f"--out {out}: stores are read by ArrayRecord, which reads local files "
                        "and gs:// objects but not s3://; write to gs:// or a local or mounted "
                        "folder")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not 0 <= seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2**32), got {seed}")
    vocabulary = provider.output_features["targets"].vocabulary
    final = store_lib.split_dir(out, task_name, split)
    job = dict(task=task_name, split=split, seed=seed, workers=workers,
               num_shards=num_shards or max(workers, 1) * 4, modules=list(modules),
               dtype=store_lib.token_dtype(vocabulary.vocab_size).name,
               vocabulary=store_lib.vocabulary_fingerprint(vocabulary), writer=WRITER)
    have = existing_store(final, seed, job["vocabulary"], num_shards, progress)
    if have is not None:
        return have
    remote = storage.is_remote(out)
    if remote:  # written in a local staging folder, each finished shard uploaded
        job["upload"] = os.fspath(final)
        partial = staging_folder(final)
        pending = _start_or_resume_upload(final, job)
    else:
        partial, pending = final.parent / (final.name + ".partial"), True
    job["partial"] = os.fspath(partial)
    _start_or_resume(partial, job)
    started = time.perf_counter()
    if pending:
        _run_phases(job, progress,
                    getattr(provider.source, "num_input_examples", lambda s: None))
    entries = [_reduce_worker(job, s) for s in range(job["num_shards"])]  # all done now
    data = manifest(task_name, split, vocabulary, seed, np.dtype(job["dtype"]), entries)
    text = json.dumps(data, indent=1) + "\n"
    if remote:
        storage.write_atomically(final / store_lib.MANIFEST, text)  # last: the store is whole
        for entry in entries:
            (final / f"{entry['name']}.done").unlink(missing_ok=True)
        (final / "job.json").unlink(missing_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    else:
        for path in partial.glob("*"):
            if not path.name.startswith("shard-") or path.name.endswith(".done"):
                path.unlink()
        (partial / store_lib.MANIFEST).write_text(text)
        partial.rename(final)
    if progress:
        print(f"prepared {final}: {data['documents']} documents, {data['tokens']} tokens in "
              f"{data['num_shards']} shards, {time.perf_counter() - started:.1f} s", flush=True)
    return data


def staging_folder(final: epath.Path) -> epath.Path:
    """The local folder where the store bound for object storage ``final`` is written before
    each shard is uploaded: under the temp folder ($TMPDIR; it needs room for the split's
    tokens twice), named by ``final`` so that a rerun on the same machine finds it."""
    digest = hashlib.sha256(os.fspath(final).encode()).hexdigest()[:16]
    return epath.Path(tempfile.gettempdir()) / "t5x-like-prepare" / f"{final.name}-{digest}"


def _start_or_resume_upload(final: epath.Path, job: dict) -> bool:
    """Claims the object-storage folder ``final`` (which has no manifest) for this job: what an
    earlier run of the same job uploaded is kept, anything else is removed. True while some
    shard is still to be uploaded."""
    settings = {k: v for k, v in job.items() if k not in ("partial", "workers")}
    have = storage.listing(final)
    same = False
    if have:
        try:
            same = json.loads((final / "job.json").read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:  # an unfinished store of other settings (no manifest): start over
            final.rmtree()
            storage.invalidate_listings(final)
    if not same:
        storage.write_atomically(final / "job.json", json.dumps(settings))
    names = [store_lib.shard_name(s, job["num_shards"]) for s in range(job["num_shards"])]
    return not (same and all(f"{name}.done" in have for name in names))


def existing_store(final: epath.Path, seed: int, fingerprint: str, num_shards: int,
                   progress: bool) -> dict | None:
    """The manifest of a store already at ``final`` written with these settings (a rerun is
    a no-op), None if there is none; a UserError if one with other settings is there."""
    if not final.exists():
        return None
    if storage.is_remote(final) and not (final / store_lib.MANIFEST).exists():
        return None  # objects of an unfinished upload: resumed or replaced by the caller
    have = store_lib.read_manifest(final)
    if (have["seed"] != seed or have["vocabulary"]["fingerprint"] != fingerprint
            or num_shards and have["num_shards"] != num_shards):
        raise UserError(f"{final} already holds a store prepared with other settings (seed, "
                        "vocabulary or shard count); remove it or choose another --out")
    if progress:
        print(f"{final} is already prepared ({have['documents']} documents, "
              f"{have['tokens']} tokens)", flush=True)
    return have


def _start_or_resume(partial: epath.Path, job: dict) -> None:
    """A partial folder of the same job is resumed; one of another job is started over."""
    marker = partial / "job.json"
    settings = {k: v for k, v in job.items() if k != "partial"}
    if partial.exists():
        try:
            same = json.loads(marker.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        tmp = partial / "job.json.tmp"
        tmp.write_text(json.dumps(settings))
        tmp.rename(marker)


def _run_phases(job: dict, progress: bool, num_input_examples) -> None:
    workers = job["workers"]
    try:
        total = num_input_examples(job["split"])
    except Exception:  # noqa: BLE001  (a source that cannot count: no total in the bar)
        total = None
    if workers == 1:
        bar = _bar(progress, total, "tokenise")
        _map_worker(job, 0, bar.update)
        bar.close()
        for shard in _bar(progress, job["num_shards"], "write", iterable=range(job["num_shards"])):
            _reduce_worker(job, shard)
        return
    ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_pool_init, initargs=(counter,)) as pool:
        pending = pool.map_async(_map_in_pool, [(job, w) for w in range(workers)])
        bar = _bar(progress, total, "tokenise")
        while not pending.ready():
            pending.wait(0.5)
            bar.n = counter.value
            bar.refresh()
        bar.close()
        pending.get()  # re-raises a worker's error
        for _ in _bar(progress, job["num_shards"], "write", iterable=pool.imap_unordered(
                _reduce_in_pool, [(job, s) for s in range(job["num_shards"])])):
            pass


def _bar(progress: bool, total, desc: str, iterable=None):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="doc" if desc == "tokenise" else "shard",
                disable=not progress, dynamic_ncols=True)
