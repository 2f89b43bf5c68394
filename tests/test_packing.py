"""Packed fine-tuning (``data.pack``): several examples per row must give each example exactly
what it gets alone in a row.

Oracles: seqio's own ``trim_and_pack_dataset`` for the row layout (tokens, ``*_segment_ids``,
``*_positions``); the same model on the same examples one per row for losses, logits and
metrics (float32, 1e-5); attention probabilities and perturbed tokens for the boundaries; an
uninterrupted run for resuming.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from t5x_like import config as config_lib
from t5x_like import train as train_lib
from t5x_like.errors import UserError
from t5x_like.experiment import build
from t5x_like.finetune import data as ft_data
from t5x_like.finetune import packing
from t5x_like.models import layers

ROOT = Path(__file__).resolve().parents[1]
INPUTS, TARGETS = 16, 8
TOL = 1e-5


def make_config(family: str, **overrides) -> config_lib.ml_collections.ConfigDict:
    c = config_lib.base_config(family)
    if family == "t5_finetune":
        c.model.update(dict(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=2,
                            num_decoder_layers=2, scan_layers=False, dropout_rate=0.0))
    elif family == "bart_finetune":
        # one layer each (as test_finetune.py's BART): the default run compiles it
        c.model.update(dict(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                            num_decoder_layers=1, max_position_embeddings=32, scan_layers=False,
                            dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0))
    else:
        c.model.update(dict(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2,
                            max_position_embeddings=64, scan_layers=False,
                            hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        c.finetune.label_names = ("hamlet", "dream", "henry")
    c.data.task = "play_lines"
    c.data.inputs_length, c.data.batch_size = INPUTS, 4
    c.finetune.targets_length = TARGETS
    for key, value in overrides.items():
        config_lib._assign(c, key, value)
    config_lib.validate(c)
    return c


@functools.cache
def setup(family: str, **overrides):
    exp = build(make_config(family, **overrides))
    return exp, exp.family.init(jax.random.key(1))


@functools.cache
def compiled(family: str, **overrides):
    """One jitted call per family giving what the tests compare: text-to-text (teacher-forced
    logits, loss sums, scores), encoder heads (head outputs, loss sums)."""
    exp, _ = setup(family, **overrides)
    fam, key = exp.family, jax.random.key(0)

    def t2t(params, batch):
        return (fam._teacher_forced(params, batch)[0], fam.loss_fn(params, batch, key,
                                                                   train=False)[1],
                fam.score_batch(params, batch))

    def encoder(params, batch):
        return fam.outputs(params, batch), fam.loss_fn(params, batch, key, train=False)[1]

    return jax.jit(encoder if family == "bert_finetune" else t2t)


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _pad(ids, length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    out[:len(ids)] = ids
    return out


# Lengths (inputs, targets): the first exactly fills a row of inputs, (9, 8) exactly fills the
# targets; (12, 2) does not fit beside (9, 8)'s targets or the others, so it starts a new row.
T2T_LENGTHS = [(16, 3), (5, 2), (7, 4), (3, 1), (9, 8), (12, 2), (2, 2)]


def t2t_examples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"inputs": np.append(rng.integers(3, 400, a - 1), 1).astype(np.int32),
             "targets": np.append(rng.integers(3, 400, b - 1), 1).astype(np.int32)}
            for a, b in T2T_LENGTHS]


def where_is(rows: list[dict], feature: str) -> list[tuple[int, np.ndarray]]:
    """(row, token positions) of each example of ``t2t_examples``, matched by content."""
    found = []
    for r, row in enumerate(rows):
        for s in range(1, int(row[f"{feature}_segment_ids"].max()) + 1):
            found.append((r, np.flatnonzero(row[f"{feature}_segment_ids"] == s)))
    return found


# --------------------------------------------------------------------------- the rows


def test_first_fit_decreasing_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(1, 17, 300), rng.integers(1, 9, 300)], 1)
    bins = packing.first_fit_decreasing(sizes, [16, 8])
    assert sorted(i for b in bins for i in b) == list(range(300))
    for b in bins:
        assert np.all(sizes[b].sum(0) <= [16, 8]) and b == sorted(b)
    assert bins == packing.first_fit_decreasing(sizes, [16, 8])  # deterministic
    # FFD beats seqio's greedy in-order packing (a new row whenever the next one overflows)
    greedy, used = 1, np.zeros(2, int)
    for s in sizes:
        if np.any(used + s > [16, 8]):
            greedy, used = greedy + 1, np.zeros(2, int)
        used += s
    assert len(bins) < greedy
    capped = packing.first_fit_decreasing(np.ones((10, 1)), [16], max_segments=3)
    assert [len(b) for b in capped] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="exceeds the row"):
        packing.first_fit_decreasing([[17, 1]], [16, 8])


def test_rows_match_seqio_trim_and_pack():
    """Examples that fit one row: our row equals seqio's packed row field by field."""
    import tensorflow as tf

    examples = [e for e in t2t_examples() if len(e["inputs"]) <= 5][:3]
    lengths = {"inputs": 16, "targets": 8}
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={
            k: tf.TensorSpec([None], tf.int32) for k in lengths})
    theirs = next(iter(__import__("seqio").utils.trim_and_pack_dataset(ds, lengths)
                       .as_numpy_iterator()))
    ours = list(packing.packed_text_to_text(iter(examples), lengths))
    assert len(ours) == 1 and set(ours[0]) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[0][key], value, err_msg=key)


def test_exact_fill_and_overflow_rows():
    # By hand, longest first: (16, 3) and (9, 8) fill a row's inputs / targets; (12, 2) fits
    # neither and opens row 3, (7, 4) fits no open row (4 inputs left in row 3) and opens row 4,
    # (5, 2) and (3, 1) join (7, 4), (2, 2) joins (12, 2); rows in order of their first example.
    assert packing.first_fit_decreasing(T2T_LENGTHS, [INPUTS, TARGETS]) == [
        [0], [1, 2, 3], [4], [5, 6]]
    rows = list(packing.packed_text_to_text(iter(t2t_examples()), {"inputs": INPUTS,
                                                                  "targets": TARGETS}))
    full = [r for r in rows if np.all(r["inputs_segment_ids"] == 1)]
    assert len(full) == 1 and full[0]["inputs_segment_ids"].max() == 1  # (16, 3) alone
    assert any(np.all(r["targets_segment_ids"] > 0) for r in rows)  # (9, 8) fills targets
    assert 1 < len(rows) < len(T2T_LENGTHS)
    assert sum(int(r["inputs_segment_ids"].max()) for r in rows) == len(T2T_LENGTHS)


# --------------------------------------------------------------------------- text-to-text


@pytest.mark.parametrize("family", ["t5_finetune", "bart_finetune"])
def test_packed_logits_losses_and_metrics_equal_unpacked(family):
    _, params = setup(family)
    run = compiled(family)
    examples = t2t_examples()
    rows = list(packing.packed_text_to_text(iter(examples), {"inputs": INPUTS,
                                                            "targets": TARGETS}))
    packed = _stack(rows)
    alone = {"inputs": np.stack([_pad(e["inputs"], INPUTS) for e in examples]),
             "targets": np.stack([_pad(e["targets"], TARGETS) for e in examples])}
    logits_p, sums_p, scores_p = jax.device_get(run(params, packed))
    logits_u, sums_u, scores_u = jax.device_get(run(params, alone))
    seen = 0
    for r, where in where_is(rows, "targets"):
        i = next(j for j, e in enumerate(examples)
                 if np.array_equal(e["targets"], rows[r]["targets"][where]))
        np.testing.assert_allclose(logits_p[r, where], logits_u[i, :len(where)], atol=TOL,
                                   rtol=TOL)
        seen += 1
    assert seen == len(examples)
    for name in ("loss", "cross_entropy", "weight", "correct", "sequence/correct",
                 "sequence/weight"):
        np.testing.assert_allclose(float(sums_p[name]), float(sums_u[name]), rtol=TOL,
                                   err_msg=name)
    assert float(sums_p["sequence/weight"]) == len(examples)
    eff_p = float(sums_p["packing/efficiency"] / sums_p["packing/weight"])
    eff_u = float(sums_u["packing/efficiency"] / sums_u["packing/weight"])
    assert eff_p > 1.4 * eff_u
    # per-example scores (rank classification), mapped back to the examples in order
    again, where = packing.pack_examples(examples, {"inputs": INPUTS, "targets": TARGETS})
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(again, rows,
                                                                         strict=True))
    np.testing.assert_allclose([scores_p[r, s] for r, s in where], scores_u, rtol=TOL)


def test_t5_perturbing_one_example_leaves_the_others_unchanged():
    _, params = setup("t5_finetune")
    run = compiled("t5_finetune")
    rows = list(packing.packed_text_to_text(iter(t2t_examples()), {"inputs": INPUTS,
                                                                  "targets": TARGETS}))
    packed = _stack(rows)
    r = next(i for i, row in enumerate(rows) if row["inputs_segment_ids"].max() >= 2)
    base = np.asarray(run(params, packed)[0])
    changed = {k: v.copy() for k, v in packed.items()}
    first_in = packed["inputs_segment_ids"][r] == 1
    first_tg = packed["targets_segment_ids"][r] == 1
    changed["inputs"][r, first_in] = 7 + changed["inputs"][r, first_in] % 300
    changed["targets"][r, first_tg] = 9 + changed["targets"][r, first_tg] % 300
    after = np.asarray(run(params, changed)[0])
    others = packed["targets_segment_ids"][r] > 1
    np.testing.assert_array_equal(after[r, others], base[r, others])
    assert np.abs(after[r, first_tg] - base[r, first_tg]).max() > 1e-3


# --------------------------------------------------------------------------- encoder heads


def encoder_parts(rows: ft_data.EncoderRows, head: str, seed: int = 0) -> list[dict]:
    """Examples of 16, 5, 7, 3, 9, 12, 2 tokens ([CLS] ... [SEP]) with the head's labels."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in (16, 5, 7, 3, 9, 12, 2):
        ids = [rows.cls, *rng.integers(5, 400, n - 2).tolist(), rows.sep]
        part = {"ids": ids}
        if head == "classification":
            part["label"] = np.asarray(rng.integers(0, 3), np.int32)
        elif head == "regression":
            part["label"] = np.asarray(rng.normal(), np.float32)
        elif head == "span_qa":
            start = int(rng.integers(1, max(2, n - 1)))
            part["start"] = np.asarray(start, np.int32)
            part["end"] = np.asarray(min(n - 2, start + 1) if n > 2 else start, np.int32)
        else:
            labels = np.full(n, -1, np.int32)
            labels[1:n - 1] = rng.integers(0, 3, n - 2)
            part["token_labels"] = labels
        parts.append(part)
    return parts


def encoder_batches(head: str, **overrides):
    exp, params = setup("bert_finetune", **{"finetune.head": head, **overrides})
    rows = exp.family._rows()
    parts = encoder_parts(rows, head)
    bins = packing.first_fit_decreasing([[len(p["ids"])] for p in parts], [INPUTS],
                                        max_segments=rows.max_segments)
    packed = _stack([rows.packed([parts[i] for i in b]) for b in bins])
    alone = _stack([rows.padded(p) for p in parts])
    order = [i for b in bins for i in b]  # example of each filled slot, row by row
    return exp, params, packed, alone, bins, order


SLOW = pytest.mark.slow


# Every head in the default run (random tiny weights, no training); the [CLS]-pooling variant
# of classification (the same slots, read without the pooler) under slow.
@pytest.mark.parametrize("head,overrides", [
    ("classification", {}),
    pytest.param("classification", {"finetune.pooling": "cls"}, marks=SLOW),
    ("regression", {}),
    ("token_classification", {}),
    ("span_qa", {"finetune.pooling": "cls"})])
def test_encoder_heads_packed_equal_unpacked(head, overrides):
    _, params, packed, alone, bins, order = encoder_batches(head, **overrides)
    assert len(bins) > 1 and [len(b) for b in bins].count(1) >= 1  # the 16-token one alone
    run = compiled("bert_finetune", **{"finetune.head": head, **overrides})
    out_p, sums_p = jax.device_get(run(params, packed))
    out_u, sums_u = jax.device_get(run(params, alone))
    if head in ("classification", "regression"):
        filled = out_p[packed["valid"] > 0]
        np.testing.assert_allclose(filled, out_u[order], atol=TOL, rtol=TOL)
    else:  # per token: each example's tokens in its row
        for r, b in enumerate(bins):
            for s, i in enumerate(b, start=1):
                where = np.flatnonzero(packed["segment_ids"][r] == s)
                np.testing.assert_allclose(out_p[r, where], out_u[i, :len(where)], atol=TOL,
                                           rtol=TOL)
    for name, value in sums_u.items():
        if not name.startswith("packing/"):
            np.testing.assert_allclose(float(sums_p[name]), float(value), rtol=TOL,
                                       atol=TOL, err_msg=name)


def test_encoder_attention_never_crosses_an_example():
    exp, params, packed, _, _, _ = encoder_batches("classification")
    model, _ = exp.family.tuned_model(params)
    out = model(packed["input_ids"], packed["attention_mask"], output_attentions=True,
                segment_ids=packed["segment_ids"], positions=packed["positions"])
    probs = np.asarray(out["attentions"])  # [layers, B, heads, L, L]
    seg = packed["segment_ids"]
    other = (seg[:, :, None] != seg[:, None, :]) | (seg[:, None, :] == 0)
    real_query = (seg > 0)[:, :, None]
    crossing = probs * (other & real_query)[None, :, None]
    assert crossing.max() == 0.0
    # each real query's probabilities sum to 1 over its own example's keys
    within = (probs * (~other)[None, :, None]).sum(-1)  # [layers, B, heads, L]
    np.testing.assert_allclose(np.moveaxis(within, 2, -1)[:, seg > 0], 1.0, rtol=1e-5)
    # the mask itself: same example and a real key
    mask = np.asarray(layers.segment_mask(seg, seg, causal=True))[:, 0]
    i, j = np.indices(seg.shape[1:] * 2)
    np.testing.assert_array_equal(mask, ~other & (j <= i)[None])
    # new tokens in one example of a row change its own head output only
    run = compiled("bert_finetune", **{"finetune.head": "classification"})
    r = int(np.argmax(packed["valid"].sum(1)))  # the row with the most examples
    changed = {k: v.copy() for k, v in packed.items()}
    first = (seg[r] == 1) & (np.arange(seg.shape[1]) > 0)  # example 1 but its [CLS]
    changed["input_ids"][r, first] = 5 + changed["input_ids"][r, first] % 300
    base, after = np.asarray(run(params, packed)[0]), np.asarray(run(params, changed)[0])
    others = np.flatnonzero(packed["valid"][r] > 0)[1:]
    assert others.size >= 1
    np.testing.assert_array_equal(after[r, others], base[r, others])
    assert np.abs(after[r, 0] - base[r, 0]).max() > 1e-6  # random weights: logits ~0.01


@pytest.mark.parametrize("preset", ["t5_finetune.py:tiny", "t5_finetune.py:base",
                                    "bert_classify.py:base", "bert_squad.py:base"])
def test_finetuning_presets_pack_by_default(preset):
    assert config_lib.load_config(str(ROOT / "configs" / preset)).data.pack is True
    assert config_lib.base_config("t5_finetune").data.pack is False  # the schema's default


def test_prompt_tuning_refuses_packing():
    with pytest.raises(UserError, match="data.pack=false"):
        make_config("t5_finetune", **{"data.pack": True, "finetune.mode": "prompt",
                                      "finetune.prompt_length": 2})
    c = config_lib.base_config("t5_finetune")
    config_lib.apply_overrides(c, ["--config.data.pack=true"])  # the switch as spelled
    assert c.data.pack is True
    with pytest.raises(UserError, match="data.pack"):
        c = config_lib.base_config("t5")
        c.data.pack = True
        config_lib.validate(c)


# --------------------------------------------------------------------------- runs


# The text-to-text stream's resume is also checked end to end (SIGKILL, bit-exact parameters)
# by the run test below; the encoder rows' stream only here.
@pytest.mark.parametrize("family", [pytest.param("t5_finetune", marks=pytest.mark.slow),
                                    "bert_finetune"])
def test_packed_stream_resumes_at_any_batch(family):
    """Skipping n batches (what a resumed run does) gives the batches a fresh stream gives
    after its first n: rows are a function of the example stream alone."""
    kw = dict(split="train", batch_size=4, seed=3, shuffle=True, repeat=True, pack=True,
              targets_length=TARGETS)
    if family == "t5_finetune":
        def stream(skip):
            return ft_data.text_to_text_batches("play_lines", inputs_length=256,
                                                skip_batches=skip, **kw)
    else:
        exp, _ = setup("bert_finetune", **{"finetune.head": "classification"})
        rows = ft_data.EncoderRows(head="classification", length=256, cls=3, sep=4, eos=1,
                                   vocabulary=exp.vocabulary,
                                   label_names=tuple(exp.config.finetune.label_names))

        def stream(skip):
            return ft_data.encoder_batches("play_lines", rows, skip_batches=skip, **kw)
    skip = 24  # any batch
    fresh = stream(0)
    first = [next(fresh) for _ in range(skip + 1)]
    resumed = next(stream(skip))
    assert set(resumed) == set(first[skip])
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], first[skip][k], err_msg=k)
    seg = first[skip]["inputs_segment_ids" if family == "t5_finetune" else "segment_ids"]
    assert seg.max() >= 2  # several examples in a row


# The tiniest fine-tuning preset, shrunk to a model whose steps take milliseconds: what costs
# here is compiling (once: the subprocess reads the in-process run's executables from the
# session's compilation cache) and starting one Python process.
RUN_CONFIG = "configs/t5_finetune.py:tiny"
NUM_STEPS = 16
RUN_OVERRIDES = ["model.d_model=16", "model.d_kv=4", "model.num_heads=2", "model.d_ff=32",
                 "model.num_encoder_layers=1", "model.num_decoder_layers=1",
                 "data.batch_size=8", "optimizer.learning_rate=0.03",
                 f"train.num_steps={NUM_STEPS}", "train.checkpoint_every=2",
                 "train.log_every=1", "train.eval_batches=0", "train.progress_bar=false"]


def _logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    steps = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line still being written
    return steps


def test_packed_finetuning_resumes_bit_exact_after_sigkill_and_evaluates_like_unpacked(
        tmp_path, capsys):
    """The packed preset: a run SIGKILLed after a checkpoint and started again ends with the
    parameters of a run that never stopped, bit for bit; it logs its packing efficiency; and
    its checkpoint evaluated on the whole validation split packed and one example per row
    gives the same metrics."""
    from t5x_like.evaluation.driver import load_checkpoint

    config = config_lib.load_config(str(ROOT / RUN_CONFIG), RUN_OVERRIDES)
    assert config.data.pack and config.model.dropout_rate > 0  # the preset's own defaults
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = config_lib.load_config(str(ROOT / RUN_CONFIG),
                                           [*RUN_OVERRIDES, f"train.checkpoint_every={NUM_STEPS}"])
    train_lib.train(uninterrupted, reference)
    argv = [sys.executable, "-m", "t5x_like.cli", "train", "--config", RUN_CONFIG,
            "--workdir", str(killed), *[f"--config.{o}" for o in RUN_OVERRIDES]]
    log = open(tmp_path / "killed.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    # Step 5 logged: the save at step 4 has begun, so the one at step 2 is complete.
    while proc.poll() is None and time.monotonic() < deadline:
        if max(_logged_steps(killed), default=0) >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.seek(0)
    assert proc.returncode == -signal.SIGKILL, f"ended by itself:\n{log.read()[-3000:]}"
    log.close()
    killed_at = max(_logged_steps(killed))
    assert killed_at < NUM_STEPS
    capsys.readouterr()
    result = train_lib.train(config, killed)  # the same command again
    resumed = re.findall(r"resumed from step (\d+)", capsys.readouterr().out)
    assert result["step"] == NUM_STEPS and len(resumed) == 1
    assert 2 <= int(resumed[0]) <= killed_at
    _, a, _ = load_checkpoint(reference)
    exp_k, b, step = load_checkpoint(killed)
    assert step == NUM_STEPS and exp_k.config.data.pack
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # the efficiency (real / row tokens) is in the log, each incarnation's lines included
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    efficiency = [m["train/packing/efficiency"] for m in logged
                  if "train/packing/efficiency" in m]
    assert len(efficiency) >= NUM_STEPS and 0.5 < min(efficiency) <= max(efficiency) <= 1.0
    # the checkpoint scored packed and one example per row: the same metrics
    exp_u, b_u, _ = load_checkpoint(killed, ["data.pack=false"])
    assert not exp_u.config.data.pack
    packed = train_lib.evaluate(exp_k, b, num_batches=0)
    alone = train_lib.evaluate(exp_u, b_u, num_batches=0)
    assert packed["tokens"] == alone["tokens"] > 0 and packed["accuracy"] > 0
    for name in ("loss", "accuracy", "sequence/accuracy"):
        np.testing.assert_allclose(packed[name], alone[name], rtol=TOL, err_msg=name)
    assert packed["packing/efficiency"] > alone["packing/efficiency"]
