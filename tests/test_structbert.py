"""StructBERT: the word structural objective's statistics against the paper's settings (K = 3,
5% of positions) over thousands of rows, the sentence structural rows (next / previous /
other document, 1/3 each) checked against the documents they came from, the loss recomputed
in NumPy, a 20-step run that lowers the loss, resumes bit-exact and is evaluated, and (slow)
the CLI and 8 fake devices."""

import json
import math
import os

import family_runs
import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli

from t5x_like import config as config_lib
from t5x_like.data import sentence_pairs, structure_pairs
from t5x_like.errors import UserError
from t5x_like.objectives.structural import WordStructure, shuffle_ngrams

CONFIG = "configs/structbert.py"
SMALL = ["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
         "model.num_layers=1", *family_runs.RUN, "objective.max_predictions=0"]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def _rows(n: int, length: int, rng: np.random.Generator):
    """Rows of distinct ids (100 + position, so a shuffle reveals its permutation), specials
    at 0 and at a random middle position, padding after a random end; 15% of the ordinary
    tokens MLM-selected by NumPy."""
    tokens = np.tile(100 + np.arange(length), (n, 1)).astype(np.int32)
    special = np.zeros((n, length), bool)
    special[:, 0] = True
    special[np.arange(n), rng.integers(10, length - 10, n)] = True
    ends = rng.integers(length // 2, length + 1, n)
    pad = np.arange(length)[None] >= ends[:, None]
    tokens[special] = 5
    tokens[pad] = 0
    eligible = ~special & ~pad
    selected = eligible & (rng.random((n, length)) < 0.15)
    return tokens, eligible, selected


def test_word_shuffles_follow_the_papers_settings_over_many_keys():
    rng = np.random.default_rng(0)
    n, length = 4000, 128
    tokens, eligible, selected = _rows(n, length, rng)
    config = WordStructure(length)  # K = 3, rate 0.05
    assert (config.k, config.rate, config.max_ngrams) == (3, 0.05, 7)
    inputs = np.where(selected, 3, tokens)  # [MASK] = 3 at the MLM's positions
    keys = jax.random.split(jax.random.key(0), n)
    out = jax.device_get(jax.jit(jax.vmap(lambda k, i, t, a, e: shuffle_ngrams(
        k, i, t, a, e, config)))(keys, inputs, tokens, eligible & ~selected, eligible))
    starts = out["starts"]
    counts = starts.sum(1)
    # round(0.05 n) blocks per row whenever the row holds that many free blocks.
    want = np.minimum(np.round(0.05 * eligible.sum(1)), config.max_ngrams)
    assert (counts <= want).all() and (counts == want).mean() > 0.99
    perms = {p: 0 for p in [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]}
    phases = np.zeros(3)
    for r, s in zip(*np.nonzero(starts), strict=True):
        block = slice(s, s + 3)
        assert eligible[r, block].all() and not selected[r, block].any()  # unmasked, ordinary
        perm = tuple(out["inputs"][r, block] - 100 - s)
        perms[perm] += 1  # a KeyError would be the identity or a non-permutation
        phases[s % 3] += 1
    # Everything outside the blocks is the MLM's row, untouched.
    moved = np.zeros_like(starts)
    for shift in range(3):
        moved[:, shift:] |= starts[:, :length - shift]
    assert np.array_equal(out["inputs"][~moved], inputs[~moved])
    total = sum(perms.values())
    assert total == counts.sum() > 10_000
    for count in perms.values():  # the 5 non-identity permutations alike
        assert abs(count / total - 1 / 5) < 4 * math.sqrt(4 / 25 / total)
    for phase in phases:  # blocks open at every position alike
        assert abs(phase / total - 1 / 3) < 4 * math.sqrt(2 / 9 / total)
    # Realised shares: 15% of the ordinary tokens shuffled (3 x 5%), MLM's 15% disjoint.
    assert abs(moved.sum() / eligible.sum() - 0.15) < 0.005
    # Slots: the shuffled positions in order, their original tokens, weight 1.
    w = out["position_weights"] > 0
    assert np.array_equal(w.sum(1), 3 * counts)
    for r in range(20):
        pos = out["positions"][r][w[r]]
        assert np.array_equal(pos, np.flatnonzero(moved[r]))
        assert np.array_equal(out["position_targets"][r][w[r]], tokens[r, pos])


def test_word_structure_settings_are_checked():
    with pytest.raises(UserError, match="word_shuffle_k"):
        WordStructure(128, k=1)
    with pytest.raises(UserError, match="word_shuffle_rate"):
        WordStructure(128, rate=0.5)


def test_sentence_structure_rows_are_next_previous_or_other_document():
    """Segments [d, s, ...] name their document and place, so each row's two segments can be
    traced back: label 0 = S2 after S1, 1 = S2 before S1 (same document), 2 = another one."""
    rng = np.random.default_rng(1)
    documents = [[np.array([1000 + d, 2000 + s] + [3000 + d] * int(rng.integers(1, 6)), np.int32)
                  for s in range(int(rng.integers(2, 12)))] for d in range(60)]
    special = sentence_pairs.SpecialTokens(pad=0, cls=5, sep=6)
    labels, checked = [], 0
    stream = structure_pairs.structure_pair_batches(documents, length=48, batch_size=50,
                                                    seed=3, special=special, repeat=True)
    for _ in range(60):
        batch = next(stream)
        for ids, types, label in zip(batch["input_ids"], batch["token_type_ids"],
                                     batch["sentence_structure_label"], strict=True):
            labels.append(int(label))
            a, b = ids[(types == 0) & (ids >= 1000)], ids[(types == 1) & (ids >= 1000)]
            marks_a, marks_b = a[a // 1000 == 2] - 2000, b[b // 1000 == 2] - 2000
            docs_a, docs_b = set(a[a // 1000 == 1]), set(b[b // 1000 == 1])
            if not (len(marks_a) and len(marks_b)):
                continue  # truncation cut a segment's head off: nothing to trace
            checked += 1
            if label == 2:
                assert not docs_a & docs_b
            else:
                assert docs_a == docs_b
                if label == 0:  # (truncation may drop whole segments at the ends)
                    assert marks_b.min() > marks_a.max()
                else:
                    assert marks_a.min() > marks_b.max()
    labels = np.array(labels)
    assert checked > 2000
    for value in range(3):
        share = (labels == value).mean()
        assert abs(share - 1 / 3) < 4 * math.sqrt(2 / 9 / len(labels)), (value, share)


def _tiny(*extra):
    os.chdir(ROOT)
    return config_lib.load_config(f"{CONFIG}:tiny", SMALL + list(extra))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_loss_is_mlm_plus_word_plus_sentence_means_by_hand():
    from t5x_like.experiment import build

    exp = build(_tiny())
    family = exp.family
    params = exp.init_state()["params"]
    batch = next(family.batches(split="train", batch_size=8, shuffle=True, repeat=True,
                                skip_batches=0, shard_index=0, num_shards=1))
    f = jax.device_get(family.features(batch, jax.random.key(4)))
    loss, sums = family.loss_fn(params, f, jax.random.key(5), train=False)
    out = family.model(params)(f["input_ids"], f["attention_mask"], f["token_type_ids"])
    log_p = _log_softmax(out["mlm_logits"])  # every position

    def mean_ce(positions, targets, weights):
        rows, cols = np.nonzero(weights)
        return -np.mean(log_p[rows, positions[rows, cols], targets[rows, cols]])

    mlm = mean_ce(f["positions"], f["targets"], f["target_weights"])
    word = mean_ce(f["word_positions"], f["word_targets"], f["word_weights"])
    labels = batch["sentence_structure_label"]
    sentence = -np.mean(_log_softmax(out["nsp_logits"])[np.arange(8), labels])
    assert out["nsp_logits"].shape == (8, 3)
    # The word slots hold shuffled tokens whose originals are the targets.
    rows, cols = np.nonzero(f["word_weights"])
    assert np.array_equal(f["word_targets"][rows, cols],
                          batch["input_ids"][rows, f["word_positions"][rows, cols]])
    total = float(loss) / float(sums["weight"])
    np.testing.assert_allclose(total, mlm + word + sentence, rtol=1e-5)
    assert abs(word) > 0.1 and abs(sentence) > 0.1
    with pytest.raises(UserError, match="StructBERT"):
        _tiny("objective.layout='nsp'")


def test_trains_resumes_bit_exact_and_evaluates(tmp_path, capsys):
    from t5x_like.evaluation.driver import evaluate_checkpoint
    from t5x_like.train import train

    config = _tiny()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(config, straight)
    assert result["step"] == 20
    family_runs.restart_from_step_10(straight, resumed)
    train(config, resumed)
    assert "resumed from step 10" in capsys.readouterr().out
    family_runs.check_run(straight, resumed, min_drop=0.5)
    report = evaluate_checkpoint(straight, num_batches=1, baseline=False)
    for name in ("accuracy", "word_structure/accuracy", "sentence_structure/accuracy"):
        assert 0.0 <= report[name] <= 1.0, name
    assert report["loss"] < 3 * math.log(8192)


@pytest.mark.slow
def test_cli_train_and_eval(tmp_path, compilation_cache):
    args = [f"--config.{o}" for o in SMALL]
    result = run_cli("train", "--config", f"{CONFIG}:tiny", "--workdir", str(tmp_path / "run"),
                     *args, env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "eval.json"
    result = run_cli("eval", "--checkpoint", str(tmp_path / "run"), "--batches", "2", "--json",
                     str(report), env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(report.read_text())
    assert 0.0 <= metrics["sentence_structure/accuracy"] <= 1.0
    assert "word_structure/accuracy" in result.stdout


@pytest.mark.slow
def test_two_steps_on_8_devices_match_one_device():
    overrides = SMALL + ["model.hidden_size=64", "model.num_heads=8",
                         "model.intermediate_size=128", "objective.static_masking=True",
                         "optimizer.warmup_steps=0"]
    runs = family_runs.two_steps_on_meshes(CONFIG + ":tiny", overrides, ROOT)
    for mesh in ("fsdp8", "tensor8"):
        np.testing.assert_allclose(runs[mesh]["losses"], runs["one"]["losses"], rtol=1e-6,
                                   atol=1e-5)
        assert runs[mesh]["sharded"] >= 6 and runs[mesh]["diff"] <= 2e-5
    assert runs["one"]["losses"][1] < runs["one"]["losses"][0]
