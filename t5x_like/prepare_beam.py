"""``t5x-like prepare --runner R``: the store writer (``prepare.py``) on Apache Beam.

The same transform as the local writer, so the store is byte-identical to the one
``prepare(..., workers=N)`` writes for the same task, split, seed and shard count:

    Create(source parts) -> Reshuffle -> FlatMap(read + tokenise part p of P, keyed by shard
    order_keys(seed, j) % num_shards) -> Flatten(one empty marker per shard) -> GroupByKey
    -> Map(write_shard into <split>.partial/, leave <shard>.done) ; then, on the driver:
    manifest from the .done entries, written last, and <split>.partial -> <split>.

Every step that decides bytes (``source_examples``, ``order_keys``, ``write_shard``,
``manifest``) is the local writer's own function. Each shard is written in a local temporary
folder and then copied, so the output folder may be on any storage epath reaches: with a
distributed runner (DataflowRunner, ...) it must be shared storage (gs://...), and the
workers need this package (``--setup_file=./pyproject.toml``) and every file the task reads
(its text or TFDS data and its vocabulary) on shared storage too; DataflowRunner also needs
Beam's Google Cloud client (``apache-beam[gcp]``) on the launching machine.

Each source part reads the task's whole example stream and keeps every P-th example (what
the local writer's workers do), so reading is repeated P times while tokenising is divided:
right while tokenising dominates; for a corpus whose reading is the cost, keep P small.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from t5x_like import prepare as prepare_lib
from t5x_like.data import store as store_lib
from t5x_like.errors import UserError

_DONE = ".done"


def _beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise UserError("--runner needs Apache Beam: install the [beam] extra "
                        "(pip install 't5x-like[beam]')") from None
    return beam


# --------------------------------------------------------------------------- on workers


@functools.cache
def _worker_task(task: str, split: str, modules: tuple[str, ...], fingerprint: str):
    """The task on a worker (imported once per process), checked to tokenise with the same
    vocabulary as on the driver: a worker that rebuilt another vocabulary would write ids
    the manifest does not describe."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    provider = prepare_lib.task_for_prepare(task, split, modules)
    vocabulary = provider.output_features["targets"].vocabulary
    if store_lib.vocabulary_fingerprint(vocabulary) != fingerprint:
        raise UserError(f"task {task!r} tokenises with another vocabulary on this worker "
                        f"({getattr(vocabulary, 'sentencepiece_model_file', vocabulary)}) "
                        "than on the launching machine; put the vocabulary on shared storage")
    return provider


def read_part(part: int, job: dict) -> Iterator[tuple[int, tuple[int, bytes]]]:
    """(shard, (source index, token bytes)) of source examples ``part::parts``."""
    task = _worker_task(job["task"], job["split"], tuple(job["modules"]), job["vocabulary"])
    dtype = np.dtype(job["dtype"])
    shards = np.uint64(job["num_shards"])
    for index, tokens in prepare_lib.source_examples(task, job["split"], part, job["parts"]):
        key = store_lib.order_keys(job["seed"], np.array([index]))[0]
        yield int(key % shards), (int(index), tokens.astype(dtype).tobytes())


def write_shard(item: tuple[int, Sequence], job: dict) -> dict:
    """Writes shard ``item[0]`` from its (source index, token bytes) values (``None`` is the
    marker that makes empty shards exist) into the partial folder; leaves its entry in
    ``<shard>.done`` for the driver and returns it."""
    shard, values = item
    values = [v for v in values if v is not None]
    dtype = np.dtype(job["dtype"])
    name = store_lib.shard_name(shard, job["num_shards"])
    sources = np.array([i for i, _ in values], np.int64)
    keys = store_lib.order_keys(job["seed"], sources)
    docs = [np.frombuffer(b, dtype) for _, b in values]
    partial = epath.Path(job["partial"])
    with tempfile.TemporaryDirectory(prefix="t5x_like_shard_") as tmp:
        entry = prepare_lib.write_shard(epath.Path(tmp), name, keys, sources, docs, dtype)
        for suffix in (".array_record", ".index.npy"):
            with open(os.path.join(tmp, name + suffix), "rb") as src, \
                    (partial / (name + suffix)).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    (partial / (name + _DONE)).write_text(json.dumps(entry))
    return entry


# --------------------------------------------------------------------------- the driver


def _is_local(path: str) -> bool:
    return "://" not in path


def _fresh_listings(path: str) -> None:
    """fsspec file systems (gcsfs, which epath uses with EPATH_USE_TF=false) cache listings
    per process; the workers wrote what the driver reads next."""
    if _is_local(path):
        return
    try:
        import fsspec

        fsspec.filesystem(path.split("://", 1)[0]).invalidate_cache()
    except (ImportError, ValueError):  # no fsspec backend for it: nothing cached either
        pass


def _publish(partial: epath.Path, final: epath.Path, names: Sequence[str],
             manifest: dict) -> None:
    """Makes the finished store visible: the manifest last, so its presence still means
    complete. A local folder is renamed; object stores (no folder rename) get copies. Files
    are named, never listed: a listing may be stale."""
    for name in names:
        (partial / (name + _DONE)).unlink(missing_ok=True)
    text = json.dumps(manifest, indent=1) + "\n"
    if _is_local(os.fspath(partial)):
        (partial / store_lib.MANIFEST).write_text(text)
        partial.rename(final)
        return
    final.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".array_record", ".index.npy"):
            (partial / (name + suffix)).copy(final / (name + suffix), overwrite=True)
    (final / store_lib.MANIFEST).write_text(text)
    partial.rmtree()


def prepare_with_beam(task_name: str, split: str, out: str, *, runner: str,
                      pipeline_args: Sequence[str] = (), num_shards: int = 0, seed: int = 0,
                      modules: Sequence[str] = (), source_parts: int = 0,
                      progress: bool = True) -> dict:
    """Writes the store of ``split`` of ``task_name`` under ``out`` with a Beam pipeline on
    ``runner``; returns its manifest (a mixture prepares each of its tasks). Beam options
    (project, region, temp_location, setup_file, num_workers, ...) pass through in
    ``pipeline_args``. The source is read in ``source_parts`` parts (0: one per shard);
    the bytes do not depend on it."""
    beam = _beam()
    if "Dataflow" in runner:
        if _is_local(out):
            raise UserError(f"--runner {runner} runs on other machines: --out must be shared "
                            f"storage they can write (e.g. gs://BUCKET/stores), not {out}")
        try:  # the Dataflow client is Beam's [gcp] extra, not part of Beam itself
            import apache_beam.runners.dataflow.internal.apiclient  # noqa: F401
        except ImportError as e:
            raise UserError(f"--runner {runner} needs Beam's Google Cloud client ({e}); "
                            "install it with pip install 'apache-beam[gcp]>=2.77,<3'") from None
    import seqio
    from apache_beam.options.pipeline_options import PipelineOptions

    provider = prepare_lib.task_for_prepare(task_name, split, modules)
    if isinstance(provider, seqio.Mixture):
        last = {}
        for task in provider.tasks:
            if split in task.splits:
                last = prepare_with_beam(task.name, split, out, runner=runner,
                                         pipeline_args=pipeline_args, num_shards=num_shards,
                                         seed=seed, modules=modules, source_parts=source_parts,
                                         progress=progress)
        return last
    if num_shards < 0 or source_parts < 0:
        raise UserError(f"--shards must be at least 1 (or 0 for the default), got {num_shards}")
    if not 0 <= seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2**32), got {seed}")
    requested, num_shards = num_shards, num_shards or 16
    vocabulary = provider.output_features["targets"].vocabulary
    dtype = store_lib.token_dtype(vocabulary.vocab_size)
    fingerprint = store_lib.vocabulary_fingerprint(vocabulary)
    final = store_lib.split_dir(out, task_name, split)
    have = prepare_lib.existing_store(final, seed, fingerprint, requested, progress)
    if have is not None:
        return have
    partial = final.parent / (final.name + ".partial")
    if partial.exists():  # a left-over of an earlier run (local or Beam): start over
        partial.rmtree()
    partial.mkdir(parents=True, exist_ok=True)
    job = dict(task=task_name, split=split, seed=seed, num_shards=num_shards,
               parts=source_parts or num_shards, modules=list(modules), dtype=dtype.name,
               vocabulary=fingerprint, partial=os.fspath(partial))

    started = time.perf_counter()
    try:
        options = PipelineOptions(list(pipeline_args), runner=runner)
    except SystemExit:  # argparse's way of rejecting an option
        raise UserError(f"Beam rejected the pipeline options {list(pipeline_args)}") from None
    pipeline = beam.Pipeline(options=options)
    documents = (pipeline
                 | "parts" >> beam.Create(list(range(job["parts"])))
                 | "spread" >> beam.Reshuffle()
                 | "tokenise" >> beam.FlatMap(read_part, job))
    markers = pipeline | "shards" >> beam.Create([(s, None) for s in range(num_shards)])
    _ = ((documents, markers)
         | "flatten" >> beam.Flatten()
         | "group" >> beam.GroupByKey()
         | "write" >> beam.Map(write_shard, job))
    result = pipeline.run()
    state = result.wait_until_finish()
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise UserError(f"the Beam pipeline ended in state {state}; rerun to start over")

    _fresh_listings(os.fspath(partial))
    names = [store_lib.shard_name(s, num_shards) for s in range(num_shards)]
    entries = []
    for name in names:
        done = partial / (name + _DONE)
        if not done.exists():
            raise UserError(f"the Beam pipeline finished without writing {name}; rerun to "
                            "start over")
        entries.append(json.loads(done.read_text()))
    data = prepare_lib.manifest(task_name, split, vocabulary, seed, dtype, entries)
    _publish(partial, final, names, data)
    if progress:
        print(f"prepared {final} on {runner}: {data['documents']} documents, "
              f"{data['tokens']} tokens in {data['num_shards']} shards, "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    return data
