"""ERNIE 1.0's knowledge masking: the shipped lexicon re-derived from the corpus, longest match
on real token rows, the three stages by step, every unit masked whole or not at all over
hundreds of keys with the realised rates, a 20-step run across the stage changes that resumes
bit-exact and is evaluated, and (slow) the CLI and 8 fake devices."""

import json
import os

import family_runs
import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli

from t5x_like import config as config_lib
from t5x_like.data import lexicon
from t5x_like.errors import UserError

CONFIG = "configs/ernie.py"
SMALL = ["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
         "model.num_layers=1", *family_runs.RUN, "objective.max_predictions=0"]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def _build(*extra):
    from t5x_like.experiment import build

    os.chdir(ROOT)
    return build(config_lib.load_config(f"{CONFIG}:tiny", SMALL + list(extra)))


@pytest.mark.slow
def test_shipped_lexicon_is_derived_from_the_corpus():
    from t5x_like.data import corpus

    units = lexicon.read_lexicon(lexicon.DEFAULT_LEXICON)
    assert units == lexicon.derive_lexicon(corpus.default_corpus_texts("train"))


def test_shipped_lexicon_holds_names_and_collocations():
    units = lexicon.read_lexicon(lexicon.DEFAULT_LEXICON)
    entities = {t for k, t in units if k == "entity"}
    phrases = {t for k, t in units if k == "phrase"}
    assert {"MARK ANTONY", "Mark Antony", "SIR TOBY BELCH", "KING LEAR"} <= entities
    assert {"my lord", "I pray you", "thou art"} <= phrases
    assert len(entities) > 100 and len(phrases) > 500
    assert all(len(t.split()) >= 2 for _, t in units)


def test_bad_lexicons_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("entity\tMark Antony\nperson\tKing Lear\n")
    with pytest.raises(UserError, match="bad.tsv:2"):
        lexicon.read_lexicon(bad)
    with pytest.raises(UserError, match="is not a file"):
        lexicon.read_lexicon(tmp_path / "missing.tsv")


def test_longest_match_on_real_tokens():
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families.bert import word_starts_of

    vocabulary = get_vocabulary(None)
    units = [("phrase", "my lord"), ("phrase", "my good lord"), ("entity", "King Lear"),
             ("entity", "Lear is")]
    matcher = lexicon.LexiconMatcher(units, vocabulary.encode, word_starts_of(vocabulary))
    row = np.array(vocabulary.encode("O my good lord, King Lear is here; My lord, mylord."))
    kinds = matcher.kinds(row)
    found = []
    for start in np.flatnonzero(kinds >= 2):
        end = start + 1
        while end < len(row) and kinds[end] == kinds[start] - 2:
            end += 1
        found.append((int(kinds[start]) - 2, vocabulary.decode(row[start:end].tolist())))
    # Longest first ("my good lord", not "my lord"), left to right ("King Lear" takes "Lear"
    # before "Lear is" can), either case of the first letter, and only at word boundaries.
    assert found == [(0, "my good lord"), (1, "King Lear"), (0, "My lord")]
    starts = word_starts_of(vocabulary)[row]
    basic, phrase, entity = (lexicon.unit_starts(starts, kinds, level) for level in range(3))
    assert np.array_equal(basic, starts)
    assert (phrase <= basic).all() and (entity <= phrase).all()
    assert basic.sum() - phrase.sum() == 2 + 1  # "good", "lord" / "lord" stop opening words
    assert phrase.sum() - entity.sum() == 1  # "Lear"


def test_stages_follow_the_step():
    exp = _build("train.num_steps=30")
    family = exp.family
    assert [family.stage(k) for k in (0, 9, 10, 19, 20, 29)] == [0, 0, 1, 1, 2, 2]

    def first(skip, repeat=True):
        return next(family.batches(split="train", batch_size=8, shuffle=True, repeat=repeat,
                                   skip_batches=skip, shard_index=0, num_shards=1))

    table = family.word_starts
    for skip, level in ((0, 0), (10, 1), (25, 2)):
        batch = first(skip)
        kinds = np.stack([family.matcher.kinds(r) for r in batch["input_ids"]])
        want = lexicon.unit_starts(table[batch["input_ids"]], kinds, level)
        assert np.array_equal(batch["unit_starts"], want)
    assert np.array_equal(first(0)["unit_starts"], table[first(0)["input_ids"]])
    evaluation = first(0, repeat=False)  # evaluation: always the last stage
    kinds = np.stack([family.matcher.kinds(r) for r in evaluation["input_ids"]])
    assert np.array_equal(evaluation["unit_starts"],
                          lexicon.unit_starts(table[evaluation["input_ids"]], kinds, 2))


def _units(kinds_row):
    """[(start, end, kind)] of the matched units of one row."""
    out = []
    for start in np.flatnonzero(kinds_row >= 2):
        end = start + 1
        while end < len(kinds_row) and kinds_row[end] == kinds_row[start] - 2:
            end += 1
        out.append((int(start), int(end), int(kinds_row[start]) - 2))
    return out


def test_units_are_masked_whole_or_not_at_all_and_the_rates():
    exp = _build("data.inputs_length=128", "objective.max_predictions=20")
    family = exp.family
    batches = family.batches(split="validation", batch_size=16, shuffle=False, repeat=False,
                             skip_batches=0, shard_index=0, num_shards=1)
    batch = next(batches)  # evaluation rows: entity stage, phrases and entities are units
    kinds = np.stack([family.matcher.kinds(r) for r in batch["input_ids"]])
    units = [(r, *u) for r in range(16) for u in _units(kinds[r])]
    assert sum(k == 1 for *_, k in units) >= 3 and sum(k == 0 for *_, k in units) >= 10
    eligible = ~np.isin(batch["input_ids"], np.asarray(family.masking.special_ids))
    features = jax.jit(family.features)
    basic = {**batch, "unit_starts": family.word_starts[batch["input_ids"]]}
    chosen = {"units": [], "basic": []}
    selected_share, split_units, basic_split = [], 0, 0
    for i in range(300):
        for name, b in (("units", batch), ("basic", basic)):
            f = jax.device_get(features(b, jax.random.key(i)))
            selected = np.zeros_like(eligible)
            rows, cols = np.nonzero(f["target_weights"])
            selected[rows, f["positions"][rows, cols]] = True
            for r, s, e, _ in units:
                part = selected[r, s:e]
                partial = part.any() and not part.all()
                if name == "units":
                    split_units += partial
                    chosen["units"].append(part.all())
                else:
                    basic_split += partial
                    chosen["basic"].append(part.mean())
            if name == "units":
                selected_share.append(selected.sum() / eligible.sum())
    assert split_units == 0  # never part of a unit
    assert basic_split > 0  # the test can fail: word-level masking does split them
    # Realised rates: 15% of the ordinary tokens (whole units may leave the last word's worth
    # of the budget unused), and a unit as likely to be masked as a token (within 0.03).
    share = np.mean(selected_share)
    assert 0.13 < share <= 0.1501, share
    unit_rate = np.mean(chosen["units"])
    assert abs(unit_rate - share) < 0.03, (unit_rate, share)


def test_trains_across_stages_resumes_bit_exact_and_evaluates(tmp_path, capsys):
    from t5x_like.evaluation.driver import evaluate_checkpoint
    from t5x_like.train import train

    os.chdir(ROOT)
    config = config_lib.load_config(f"{CONFIG}:tiny", SMALL)  # stages at steps 7 and 14
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(config, straight)
    assert result["step"] == 20
    family_runs.restart_from_step_10(straight, resumed)
    train(config, resumed)  # resumes inside the phrase stage, crosses into the entity one
    assert "resumed from step 10" in capsys.readouterr().out
    family_runs.check_run(straight, resumed, min_drop=0.3)
    report = evaluate_checkpoint(straight, num_batches=1, baseline=False)
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["nsp/accuracy"] <= 1.0


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
    assert 0.0 <= json.loads(report.read_text())["nsp/accuracy"] <= 1.0


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
