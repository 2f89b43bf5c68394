"""Prepared token stores (issue: pod-scale data): ``t5x-like prepare`` writes them atomically
and resumably; training reads them with Grain so that global batch k is a function of (seed, k)
alone: resuming costs the same at any step, real processes 1, 2 and 4 see the same global
batches, a SIGKILLed run resumes bit-identical, damage is named before anything compiles,
mixtures sample at seqio's rates, and every family that pretrains on text trains from a store.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import family_runs
import jax
import numpy as np
import pytest
import seqio
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli

from t5x_like import config as config_lib
from t5x_like import tasks
from t5x_like.data import store_input
from t5x_like.data.store import StoreSplit
from t5x_like.data.store_pairs import StoreDocuments, pair_example, store_pair_batches
from t5x_like.errors import UserError
from t5x_like.prepare import prepare

TASK = tasks.DEFAULT_TASK
SHARDS = 4
# The resume-latency bound: reading batch 10 and batch 1,000,000 may differ by this much
# (both are a handful of index computations and one read; streaming replay of 1e6 batches
# would take hours).
RESUME_LATENCY_BOUND_S = 0.5


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for split in ("train", "validation"):
        prepare(TASK, split, str(root), num_shards=SHARDS, progress=False)
    return root


def _batches(store, k0, n, **kw):
    it = store_input.token_batches([store], None, raw_length=64, global_batch=8, seed=3,
                                   start_batch=k0, read_threads=1, **kw)
    return [next(it)["tokens"] for _ in range(n)]


# --------------------------------------------------------------------------- the store


def test_manifest_describes_the_store_and_documents_are_the_tasks_examples(store_dir):
    store = StoreSplit(store_dir, TASK, "validation")
    m = store.manifest
    assert m["task"] == TASK and m["split"] == "validation" and m["num_shards"] == SHARDS
    assert m["dtype"] == "uint16" and m["vocabulary"]["vocab_size"] == 8100
    assert sum(s["documents"] for s in m["shards"]) == m["documents"] == len(store.index)
    # seqio's own pipeline up to the cache point, in source order, is the oracle
    task = seqio.get_mixture_or_task(TASK)
    want = [ex["targets"] for ex in task.preprocess_precache(
        task.source.get_dataset(split="validation", shuffle=False)).as_numpy_iterator()]
    assert m["documents"] == len(want) and m["tokens"] == sum(len(w) for w in want)
    got = store.documents(store.source_order)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    # shuffled once: store order is not source order
    assert not np.array_equal(store.index[:, 1], np.arange(len(want)))


def test_a_store_read_with_another_vocabulary_is_refused(store_dir):
    store = StoreSplit(store_dir, TASK, "validation")
    with pytest.raises(UserError, match="another vocabulary"):
        store.check_vocabulary(seqio.ByteVocabulary())


# --------------------------------------------------------------------------- the reader


def test_resume_costs_the_same_at_step_10_and_step_1e6(store_dir):
    store = StoreSplit(store_dir, TASK, "train")
    _batches(store, 0, 1)  # opens the readers and loads the index once

    def first_batch_seconds(k):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            _batches(store, k, 1)
            times.append(time.perf_counter() - start)
        return min(times)

    near, far = first_batch_seconds(10), first_batch_seconds(1_000_000)
    assert abs(far - near) < RESUME_LATENCY_BOUND_S, (near, far)


def test_batches_are_the_chunks_of_a_per_epoch_permutation(store_dir):
    """Batch k row r is chunk perm_e(k B + r) of the store-order stream: every chunk once per
    epoch, a different order in the next."""
    store = StoreSplit(store_dir, TASK, "validation")
    chunks = store.stream_slice(0, store.num_tokens)
    count = len(chunks) // 64
    table = {chunks[c * 64:(c + 1) * 64].tobytes(): c for c in range(count)}
    rows = np.concatenate(_batches(store, 0, 2 * count // 8 + 1))
    seen = [table[row.tobytes()] for row in rows]
    assert sorted(seen[:count]) == list(range(count))
    assert sorted(seen[count:2 * count]) == list(range(count))
    assert seen[:count] != seen[count:2 * count]


_PROCESS_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from t5x_like.data import store_input
    from t5x_like.data.store import StoreSplit
    root, p, count, first, last, out = sys.argv[1:7]
    store = StoreSplit(root, "{task}", "train")
    it = store_input.token_batches([store], None, raw_length=64, global_batch=8, seed=3,
                                   start_batch=int(first), process_index=int(p),
                                   process_count=int(count), read_threads=2)
    np.save(out, np.stack([next(it)["tokens"] for _ in range(int(first), int(last))]))
""").format(task=TASK)


def _rows_from_processes(store_dir, tmp_path, count, first, last):
    """Global batches [first, last) as ``count`` real processes read them, rows rejoined."""
    procs, outs = [], []
    for p in range(count):
        out = tmp_path / f"rows-{count}-{first}-{p}.npy"
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _PROCESS_SCRIPT, str(store_dir), str(p), str(count),
             str(first), str(last), str(out)], cwd=ROOT))
        outs.append(out)
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    return np.concatenate([np.load(o) for o in outs], axis=1)  # [batches, B, L]


def test_global_batches_are_the_same_on_1_2_and_4_processes_and_across_a_resume(
        store_dir, tmp_path):
    one = _rows_from_processes(store_dir, tmp_path, 1, 0, 51)
    assert one.shape == (51, 8, 64)
    for count in (2, 4):
        np.testing.assert_array_equal(_rows_from_processes(store_dir, tmp_path, count, 0, 51), one)
    # checkpointed at step 20 on 2 processes (k = 20 is all it keeps), resumed on 1
    before = _rows_from_processes(store_dir, tmp_path, 2, 0, 20)
    after = _rows_from_processes(store_dir, tmp_path, 1, 20, 51)
    np.testing.assert_array_equal(np.concatenate([before, after]), one)


def test_continuing_rows_follow_their_text_for_consecutive_batches(store_dir):
    store = StoreSplit(store_dir, TASK, "train")
    stream = store.stream_slice(0, store.num_tokens)
    batches = _batches(store, 0, 8, consecutive_batches=4)
    for r in range(8):
        for k in (0, 4):  # within each block of 4 batches, row r reads consecutive chunks
            joined = np.concatenate([batches[k + t][r] for t in range(4)])
            start = _find(stream, joined[:64])
            np.testing.assert_array_equal(stream[start:start + 256], joined)


def _find(stream: np.ndarray, chunk: np.ndarray) -> int:
    view = np.lib.stride_tricks.sliding_window_view(stream, len(chunk))[::len(chunk)]
    return int(np.flatnonzero((view == chunk).all(1))[0]) * len(chunk)


def test_evaluation_reads_every_chunk_once_in_order(store_dir):
    store = StoreSplit(store_dir, TASK, "validation")
    it = store_input.token_batches([store], None, raw_length=64, global_batch=8, seed=3,
                                   shuffle=False, repeat=False)
    rows = np.concatenate([b["tokens"] for b in it])
    count = (store.num_tokens // 64) // 8 * 8
    np.testing.assert_array_equal(rows.reshape(-1), store.stream_slice(0, count * 64))


# --------------------------------------------------------------------------- mixtures


def test_mixture_shares_are_within_4_standard_errors_of_seqio_rates():
    rates = [0.55, 0.3, 0.15]
    index = store_input.ChunkIndex([1000, 37, 5000], rates, seed=5, shuffle=True, repeat=True)
    n = 25_000  # 4 standard errors: 0.9-1.3 points of share
    picks = np.array([index(i)[0] for i in range(n)])
    for t, rate in enumerate(rates):
        share = np.mean(picks == t)
        assert abs(share - rate) < 4 * math.sqrt(rate * (1 - rate) / n), (t, share, rate)
    # a function of the index: any range read again gives the same picks
    assert [index(i) for i in range(70_000, 70_050)] == [index(i) for i in range(70_000, 70_050)]


def test_a_mixture_of_prepared_tasks_trains_at_the_mixtures_rates(tmp_path):
    from t5x_like.tasks.mixtures import mixing_rates, register_mixture
    from t5x_like.tasks.stores import task_stores

    for name, lines in (("store_mix_a", 300), ("store_mix_b", 100)):
        (tmp_path / f"{name}.txt").write_text(
            "".join(f"{name} line {i} holds some words to tokenise\n" for i in range(lines)))
        tasks.register_text_task(name, str(tmp_path / f"{name}.txt"))
    register_mixture("store_mix", ["store_mix_a", "store_mix_b"], cap=200)
    prepare("store_mix", "train", str(tmp_path / "stores"), num_shards=2, progress=False)
    stores, rates = task_stores(str(tmp_path / "stores"), "store_mix", "train", None)
    assert [s.task for s in stores] == ["store_mix_a", "store_mix_b"]
    want = mixing_rates("store_mix")
    assert rates == [want["store_mix_a"], want["store_mix_b"]]
    whole = store_input.token_batches(stores, rates, raw_length=16, global_batch=4, seed=0)
    halves = [store_input.token_batches(stores, rates, raw_length=16, global_batch=4, seed=0,
                                        process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(5):
        np.testing.assert_array_equal(
            next(whole)["tokens"], np.concatenate([next(h)["tokens"] for h in halves]))


# --------------------------------------------------------------------------- sentence pairs


def test_pairs_follow_the_recipe_and_do_not_depend_on_the_process_count(store_dir):
    store = StoreSplit(store_dir, TASK, "train")
    docs = StoreDocuments(store, examples_per_document=64, sentence_ends=(), eos=1)
    labels = {"nsp": [], "sop": []}
    for objective in labels:
        for slot in range(300):
            rng = np.random.default_rng([0, slot])
            d = slot % docs.count
            a, b, label = pair_example(docs, d, 0, rng, objective, 10_000, 0.0)
            labels[objective].append(label)
            text = np.concatenate(docs.segments(d))
            first, second = (b, a) if objective == "sop" and label else (a, b)
            joined = np.concatenate([first, second])
            contiguous = _find_anywhere(text, joined)
            # IsNext / SOP either way: A and B are consecutive text of the same document
            assert contiguous == (objective == "sop" or label == 0), (objective, label)
    for objective, drawn in labels.items():  # fair coin: 300 draws within 4 standard errors
        assert abs(np.mean(drawn) - 0.5) < 4 * math.sqrt(0.25 / 300), objective

    def rows(count, p, k0=0):
        it = store_pair_batches(store, objective="nsp", length=64, global_batch=8, seed=1,
                                special=_special(), examples_per_document=64,
                                sentence_ends=(), eos=1, start_batch=k0, process_index=p,
                                process_count=count, read_threads=1)
        return [next(it) for _ in range(3)]

    one = rows(1, 0)
    two = [rows(2, p) for p in (0, 1)]
    for k in range(3):
        for key in one[k]:
            np.testing.assert_array_equal(
                one[k][key], np.concatenate([two[0][k][key], two[1][k][key]]))
    resumed = rows(1, 0, k0=2)[0]
    np.testing.assert_array_equal(resumed["input_ids"], one[2]["input_ids"])


BOS, EOS = 9001, 9002  # outside the 8,100-entry vocabulary: never in the text


def _special():
    from t5x_like.data.sentence_pairs import SpecialTokens

    return SpecialTokens(pad=0, cls=BOS, sep=EOS, bos=BOS, eos=EOS)


def _find_anywhere(text: np.ndarray, piece: np.ndarray) -> bool:
    if len(piece) > len(text):
        return False
    view = np.lib.stride_tricks.sliding_window_view(text, len(piece))
    return bool((view == piece).all(1).any())


def test_full_sentence_rows_pack_whole_segments(store_dir):
    store = StoreSplit(store_dir, TASK, "validation")
    it = store_pair_batches(store, objective="full_sentences", length=64, global_batch=8,
                            seed=1, special=_special(), examples_per_document=64,
                            sentence_ends=(), eos=1, repeat=False, read_threads=1)
    docs = StoreDocuments(store, 64, (), 1)
    texts = [docs._strip(t) for t in store.documents(store.source_order)]
    stream = np.concatenate(texts)
    piece_starts = set()
    offset = 0
    for text in texts:  # examples, cut into pieces of at most a row's 62 tokens
        piece_starts.update(range(offset, offset + max(len(text), 1), 62))
        offset += len(text)
    rows = 0
    for batch in it:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            row = ids[:mask.sum()]
            assert row[0] == BOS and row[-1] == EOS and BOS not in row[1:]
            # between <s> and </s>: runs of whole pieces, </s> between documents
            for part in np.split(row[1:-1], np.flatnonzero(row[1:-1] == EOS)):
                part = part[1:] if len(part) and part[0] == EOS else part
                view = np.lib.stride_tricks.sliding_window_view(stream, len(part))
                starts = set(np.flatnonzero((view == part).all(1)).tolist())
                assert starts & piece_starts, "a row part that is not whole pieces"
            rows += 1
    assert rows >= 8


# --------------------------------------------------------------------------- prepare


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_killed_mid_write_then_rerun_equals_a_clean_store(store_dir, tmp_path):
    out = tmp_path / "killed"
    partial = out / TASK / "train.partial"
    argv = ["prepare", "--task", TASK, "--split", "train", "--out", str(out),
            "--shards", str(SHARDS), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "t5x_like.cli", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(partial.glob("bucket-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / TASK / "train").exists()  # nothing visible but the partial folder
    done = run_cli(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not partial.exists()
    assert _files(out / TASK / "train") == _files(store_dir / TASK / "train")


def _train_argv(workdir, store, *extra):
    return ["train", "--config", TINY_CONFIG, "--workdir", str(workdir),
            f"--config.data.store={store}", *TINY_OVERRIDES, *extra]


@pytest.mark.parametrize("damage", ["flip", pytest.param("delete", marks=pytest.mark.slow)])
def test_a_damaged_shard_is_named_before_anything_compiles(store_dir, tmp_path, damage):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    shard = copy / TASK / "train" / "shard-00002-of-00004.array_record"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        want = "shard-00002-of-00004.array_record does not match its checksum"
    else:
        shard.unlink()
        want = "shard-00002-of-00004.array_record is missing"
    result = run_cli(*_train_argv(tmp_path / "run", copy))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and want in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- training


def _params(workdir):
    return family_runs.checkpoint_params(workdir)[1]


# -m slow: the default run resumes a store's batches exactly across processes and a restart
# (test_global_batches_..._across_a_resume) and SIGKILLs training in test_reliability.py.
@pytest.mark.slow
def test_sigkill_and_resume_from_a_store_is_bit_identical(store_dir, tmp_path):
    steps = ["--config.train.num_steps=40", "--config.train.eval_every=40"]
    straight = run_cli(*_train_argv(tmp_path / "straight", store_dir, *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text()
            .splitlines()]
    assert any("train/data_wait_s" in r for r in rows)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "t5x_like.cli",
                             *_train_argv(killed, store_dir, *steps)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        lines = (killed / "metrics.jsonl").read_text().splitlines() \
            if (killed / "metrics.jsonl").exists() else []
        if any(json.loads(x)["step"] >= 24 for x in lines):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli(*_train_argv(killed, store_dir, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # from 20, or from 10 when the kill came while checkpoint 20 was being written
    assert re.search(r"resumed from step (10|20)\b", resumed.stdout), resumed.stdout[-2000:]
    a, b = _params(tmp_path / "straight"), _params(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# The default run trains BERT (pairs by index) here and T5 in the SIGKILL test above; the
# token-stream and continuing-row families (GPT, XLNet) and the rest under `slow`.
FAMILIES = {
    "bert": ("configs/bert_mlm_nsp.py", ["model.hidden_size=32", "model.num_heads=4",
             "model.intermediate_size=64", "model.num_layers=1", "objective.max_predictions=0"]),
    "gpt": ("configs/gpt_lm.py", ["model.d_model=32", "model.num_heads=4", "model.d_kv=8",
            "model.d_ff=64", "model.num_layers=1"]),
    "xlnet": ("configs/xlnet_plm.py", ["model.d_model=32", "model.num_heads=4", "model.d_ff=64",
              "model.num_layers=1", "model.mem_len=16"]),
}
_SEQ2SEQ = ["model.d_model=32", "model.num_heads=4", "model.d_ff=64",
            "model.num_encoder_layers=1", "model.num_decoder_layers=1"]
_ENCODER = FAMILIES["bert"][1]
SLOW_FAMILIES = {
    "bart": ("configs/bart_denoise.py", _SEQ2SEQ),
    "mass": ("configs/mass.py", _SEQ2SEQ),
    "unilm": ("configs/unilm.py", FAMILIES["gpt"][1]),
    "roberta": ("configs/roberta_mlm.py", _ENCODER),
    "albert": ("configs/albert_sop.py", [*_ENCODER, "model.embedding_size=16"]),
    "spanbert": ("configs/spanbert.py", _ENCODER),
    "electra": ("configs/electra_rtd.py", [*_ENCODER, "model.embedding_size=16",
                "model.generator_fraction=0.5"]),
}


def _train_family_from_store(name, spec, store_dir, tmp_path):
    from t5x_like.train import train

    path, model = spec
    os.chdir(ROOT)
    config = config_lib.load_config(f"{path}:tiny", [*model, *family_runs.RUN,
                                                    f"data.store={store_dir}"])
    result = train(config, tmp_path / name)
    losses = family_runs.logged_losses(tmp_path / name)
    assert result["step"] == 20 and len(losses) == 20
    assert all(math.isfinite(v) for v in losses.values())
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)])
    assert 0 <= result["train/data_wait_s"] < 60


@pytest.mark.parametrize("name", ["bert", *(pytest.param(n, marks=pytest.mark.slow)
                                           for n in ("gpt", "xlnet"))])
def test_family_trains_20_steps_from_a_store(name, store_dir, tmp_path):
    _train_family_from_store(name, FAMILIES[name], store_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_FAMILIES))
def test_every_other_text_family_trains_20_steps_from_a_store(name, store_dir, tmp_path):
    _train_family_from_store(name, SLOW_FAMILIES[name], store_dir, tmp_path)
