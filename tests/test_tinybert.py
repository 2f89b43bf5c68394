"""TinyBERT: its losses against a NumPy reference written from the paper's equations, the layer
mappings, and a 4-layer student distilled from a 12-layer BERT teacher through the real loop
(loss falls, bit-exact resume, ``t5x-like eval``), then on 8 fake devices (slow)."""

import json
import os

import family_runs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli

from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.families import tinybert as T

# Teacher and student share 8 heads (attention maps compare one to one); widths differ.
WIDTH = ["model.hidden_size=32", "model.num_heads=8", "model.intermediate_size=64"]
TEACHER = ["configs/bert_mlm_nsp.py:tiny", "objective.layout=full_sentences",
           "model.nsp_head=False", "model.pooler=False", "model.num_layers=12",
           "model.hidden_size=64", "model.num_heads=8", "model.intermediate_size=128",
           "model.scan_layers=True", "train.num_steps=4", "train.eval_batches=0",
           "train.checkpoint_every=4",
           "train.progress_bar=False", "data.inputs_length=32", "data.batch_size=8"]
# Scanned stacks: one compiled layer each, whatever the depth (the CPU's compile time rules).
STUDENT = [*family_runs.RUN, *WIDTH, "model.num_layers=4", "model.scan_layers=True",
           "objective.stage=both"]


# --------------------------------------------------------------------------- NumPy reference


def _np_mse(a, b, mask):
    """The paper's MSE over real tokens: mean over tokens and features of (a - b)^2."""
    d2 = ((a - b) ** 2).mean(-1)  # [B, L]
    return float((d2 * mask).sum() / mask.sum())


def _np_att_mse(a, b, mask):
    """Attention maps [B, heads, L, L]: (1/h) sum_heads MSE, over real queries."""
    d2 = ((a - b) ** 2).mean(axis=(1, 3))  # [B, L]
    return float((d2 * mask).sum() / mask.sum())


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_losses_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    b, length, p, v, hs, ht, heads, m_layers, n_layers = 2, 6, 3, 11, 4, 8, 2, 2, 6
    mask = np.ones((b, length), np.float32)
    mask[1, 4:] = 0  # a padded row
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    targets = rng.integers(0, v, (b, p))
    student = {"mlm_logits": rng.normal(size=(b, p, v)),
               "hidden_states": rng.normal(size=(m_layers + 1, b, length, hs)),
               "attentions": _np_softmax(rng.normal(size=(m_layers, b, heads, length, length)))}
    teacher = {"mlm_logits": rng.normal(size=(b, p, v)),
               "hidden_states": rng.normal(size=(n_layers + 1, b, length, ht)),
               "attentions": _np_softmax(rng.normal(size=(n_layers, b, heads, length, length)))}
    w_e, w_h = rng.normal(size=(hs, ht)), rng.normal(size=(hs, ht))
    mapping = T.layer_mapping(m_layers, n_layers)
    np.testing.assert_array_equal(mapping, [3, 6])  # g(m) = m * 6 / 2
    weights_obj = T.TinyBertWeights(alpha_embedding=0.5, alpha_hidden=2.0, alpha_attention=3.0,
                                    alpha_prediction=1.5, temperature=2.0)
    sums = T.tinybert_distillation(
        jax.tree.map(jnp.asarray, student), jax.tree.map(jnp.asarray, teacher),
        {"targets": jnp.asarray(targets), "weights": jnp.asarray(weights),
         "attention_mask": jnp.asarray(mask)},
        weights_obj, mapping, lambda x: x @ jnp.asarray(w_e), lambda x: x @ jnp.asarray(w_h))
    scored = weights.sum()
    emb = _np_mse(student["hidden_states"][0] @ w_e, teacher["hidden_states"][0], mask)
    hid = sum(_np_mse(student["hidden_states"][m] @ w_h, teacher["hidden_states"][g], mask)
              for m, g in ((1, 3), (2, 6)))
    att = sum(_np_att_mse(student["attentions"][m - 1], teacher["attentions"][g - 1], mask)
              for m, g in ((1, 3), (2, 6)))
    t = 2.0
    soft_rows = -(_np_softmax(teacher["mlm_logits"] / t)
                  * np.log(_np_softmax(student["mlm_logits"] / t))).sum(-1)
    soft = t**2 * (soft_rows * weights).sum()
    got = {k: float(v) for k, v in sums.items()}
    np.testing.assert_allclose(got["tinybert/embedding_mse"] / scored, emb, rtol=1e-5)
    np.testing.assert_allclose(got["tinybert/hidden_mse"] / scored, hid, rtol=1e-5)
    np.testing.assert_allclose(got["tinybert/attention_mse"] / scored, att, rtol=1e-5)
    np.testing.assert_allclose(got["tinybert/soft_cross_entropy"], soft, rtol=1e-5)
    expected = scored * (0.5 * emb + 2.0 * hid + 3.0 * att) + 1.5 * soft
    np.testing.assert_allclose(got["loss"], expected, rtol=1e-5)
    # The stages keep only their terms.
    inter = weights_obj.for_stage("intermediate")
    assert inter.alpha_prediction == 0 and inter.alpha_hidden == 2.0
    pred = weights_obj.for_stage("prediction")
    assert (pred.alpha_embedding, pred.alpha_hidden, pred.alpha_attention) == (0, 0, 0)


def test_layer_mappings_are_the_papers_three():
    np.testing.assert_array_equal(T.layer_mapping(4, 12), [3, 6, 9, 12])
    np.testing.assert_array_equal(T.layer_mapping(4, 12, "top"), [9, 10, 11, 12])
    np.testing.assert_array_equal(T.layer_mapping(4, 12, "bottom"), [1, 2, 3, 4])
    with pytest.raises(UserError, match="at least as deep"):
        T.layer_mapping(6, 4)
    with pytest.raises(UserError, match="divide evenly"):
        T.layer_mapping(5, 12)


# --------------------------------------------------------------------------- the real loop


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cache):
    """A 12-layer BERT (64 wide, scanned) saved as a run at step 0, as ``import-hf`` writes
    one: the students only need its outputs, and no train step has to compile for it."""
    os.chdir(ROOT)
    return family_runs.step_zero_workdir(config_lib.load_config(TEACHER[0], TEACHER[1:]),
                                         tmp_path_factory.mktemp("tinybert") / "teacher12")


def _student(teacher, *extra):
    os.chdir(ROOT)
    return config_lib.load_config("configs/tinybert.py:tiny",
                                  [*STUDENT, f"objective.teacher={teacher}", *extra])


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory, cache):
    """20 steps of a 4-layer student from the 12-layer teacher, and the same run resumed from
    its step-10 checkpoint."""
    import contextlib
    import io

    from t5x_like.train import train

    config = _student(teacher)
    base = tmp_path_factory.mktemp("student")
    straight, resumed = base / "straight", base / "resumed"
    result = train(config, straight)
    family_runs.restart_from_step_10(straight, resumed)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(config, resumed)
    return straight, resumed, result, out.getvalue()


def test_a_4_layer_student_distils_from_a_12_layer_teacher(teacher, distilled):
    straight, resumed, result, log = distilled
    for name in ("embedding_mse", "hidden_mse", "attention_mse", "soft_cross_entropy"):
        assert np.isfinite(result[f"eval/tinybert/{name}"]), name
    assert "resumed from step 10" in log
    family_runs.check_run(straight, resumed, min_drop=0.5)
    _, params, _ = family_runs.checkpoint_params(straight)
    assert set(params) == {"student", "teacher", "embedding_projection", "projection"}
    assert params["student"]["encoder"]["layers"]["ffn"]["wi"]["kernel"].shape[0] == 4
    assert params["teacher"]["encoder"]["layers"]["ffn"]["wi"]["kernel"].shape[0] == 12
    assert params["projection"]["kernel"].shape == (32, 64)
    # The teacher is frozen: equal to the checkpoint it came from.
    _, original, _ = family_runs.checkpoint_params(teacher)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(params["teacher"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_eval_reports_the_distillation_terms(distilled, tmp_path, cache):
    straight = distilled[0]
    report = tmp_path / "eval.json"
    out = run_cli("eval", "--checkpoint", str(straight), "--batches", "1", "--json",
                  str(report), env=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(report.read_text())
    assert metrics["step"] == 20 and np.isfinite(metrics["tinybert/hidden_mse"])
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.slow
def test_the_prediction_stage_continues_the_intermediate_student(teacher, tmp_path, cache):
    from t5x_like.experiment import build
    from t5x_like.train import train

    first = tmp_path / "intermediate"
    short = ["train.num_steps=10", "train.eval_batches=0"]
    train(_student(teacher, "objective.stage=intermediate", *short), first)
    config = _student(teacher, "objective.stage=prediction", f"objective.init_student={first}",
                      *short)
    start = jax.device_get(build(config).init_state()["params"])
    _, trained, _ = family_runs.checkpoint_params(first)
    for x, y in zip(jax.tree.leaves(trained["student"]), jax.tree.leaves(start["student"]),
                    strict=True):
        np.testing.assert_array_equal(x, y)  # the student starts where stage 1 ended
    train(config, tmp_path / "prediction")
    rows = [json.loads(line) for line in
            (tmp_path / "prediction" / "metrics.jsonl").read_text().splitlines()]
    logged = {k for row in rows for k in row}
    assert "train/tinybert/soft_cross_entropy" in logged
    assert "train/tinybert/hidden_mse" not in logged  # the prediction stage has no MSE terms


def test_bad_settings_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="objective.stage"):
        _student(tmp_path, "objective.stage=general")
    with pytest.raises(UserError, match="objective.teacher is empty"):
        _student("", "objective.teacher=")


@pytest.mark.slow
def test_two_steps_on_8_devices_match_one_device(teacher):
    overrides = [*STUDENT, f"objective.teacher={teacher}", "objective.static_masking=True",
                 "optimizer.warmup_steps=0"]
    runs = family_runs.two_steps_on_meshes("configs/tinybert.py:tiny", overrides, ROOT)
    one = runs["one"]
    for mesh in ("fsdp8", "tensor8"):
        run = runs[mesh]
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5, atol=1e-5)
        assert run["losses"][1] < run["losses"][0]
        assert run["diff"] <= 2e-5, (mesh, run["diff"])
        assert run["sharded"] >= 6, run
    assert one["sharded"] == 0


# --------------------------------------------------------------------------- task-specific

# A fine-tuned teacher (2 layers, 64 wide) and a 1-layer student (32 wide), 2 heads each, on
# play_lines (which of five plays a speech is from), packed rows of 32 tokens, through the CLI.
TASK_RUN = ["data.inputs_length=32", "data.batch_size=8", "train.log_every=1",
            "train.eval_batches=0", "train.progress_bar=False", "optimizer.warmup_steps=2",
            "optimizer.learning_rate=0.003", "finetune.init_checkpoint="]
TASK_TEACHER = [*TASK_RUN, "model.hidden_size=64", "model.num_heads=2",
                "model.intermediate_size=128", "model.pooler=False", "finetune.pooling=cls",
                "train.num_steps=6", "train.checkpoint_every=6"]
TASK_STUDENT = [*TASK_RUN, "model.hidden_size=32", "model.num_heads=2",
                "model.intermediate_size=64", "train.num_steps=12", "train.checkpoint_every=12"]


def _cli(*argv: str) -> str:
    return family_runs.cli_in_process(ROOT, *argv)


def _flags(overrides):
    return [f"--config.{o}" for o in overrides]


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory, cache):
    """``t5x-like train`` of a bert_classify teacher (6 steps), then the two task-distillation
    steps of ``configs/tinybert.py:task_tiny`` (12 steps each), and ``t5x-like eval``."""
    base = tmp_path_factory.mktemp("tinybert_task")
    teacher, inter, pred = base / "teacher", base / "intermediate", base / "prediction"
    _cli("train", "--config", "configs/bert_classify.py:tiny", "--workdir", str(teacher),
         *_flags(TASK_TEACHER))
    student = ["train", "--config", "configs/tinybert.py:task_tiny",
               *_flags([*TASK_STUDENT, f"objective.teacher={teacher}"])]
    _cli(*student, "--workdir", str(inter))
    _cli(*student, "--workdir", str(pred), "--config.objective.stage=prediction",
         f"--config.finetune.init_checkpoint={inter}")
    report = base / "eval.json"
    _cli("eval", "--checkpoint", str(pred), "--batches", "2", "--no-baseline", "--json",
         str(report))
    return teacher, inter, pred, json.loads(report.read_text())


def _falls(workdir, key="train/loss"):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r[key] for r in rows if key in r]
    assert len(losses) == 12, losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    return {k for r in rows for k in r}


@pytest.mark.slow
def test_task_distillation_steps_train_and_eval_reports_the_task_metric(task_runs):
    teacher, inter, pred, report = task_runs
    logged = _falls(inter)
    assert {"train/tinybert/hidden_mse", "train/tinybert/attention_mse",
            "train/tinybert/embedding_mse"} <= logged
    assert "train/tinybert/soft_cross_entropy" not in logged  # intermediate step: no soft CE
    logged = _falls(pred)
    assert "train/tinybert/hidden_mse" not in logged
    # The intermediate step trains the encoder and projections, not the head or the teacher.
    _, t, _ = family_runs.checkpoint_params(teacher)
    _, a, _ = family_runs.checkpoint_params(inter)
    _, b, _ = family_runs.checkpoint_params(pred)
    for x, y in zip(jax.tree.leaves({"model": t["model"], "head": t["head"]}),
                    jax.tree.leaves(b["teacher"]), strict=True):
        np.testing.assert_array_equal(x, y)
    assert set(a) == {"model", "head", "teacher", "embedding_projection", "projection"}
    assert set(b) == {"model", "head", "teacher"}  # no projections in the prediction step
    # The prediction step started from the intermediate step's encoder, and moved it.
    word = ("embeddings", "word_embeddings")
    assert not np.array_equal(a["model"][word[0]][word[1]], b["model"][word[0]][word[1]])
    assert report["step"] == 12 and report["task"] == "play_lines"
    for name in ("accuracy", "teacher/accuracy"):
        assert 0.0 <= report[name] <= 1.0, report
    assert np.isfinite(report["tinybert/soft_cross_entropy"])


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def task_teacher(tmp_path_factory, cache):
    """A bert_classify teacher (TASK_TEACHER's shape) saved as a run at step 0, and its
    experiment and parameters: no train step compiles for it."""
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.experiment import build

    os.chdir(ROOT)
    workdir = tmp_path_factory.mktemp("task_teacher") / "teacher"
    exp = build(config_lib.load_config("configs/bert_classify.py:tiny", TASK_TEACHER))
    state = exp.init_state()
    workdir.mkdir()
    exp.write_config(workdir)
    checkpoints = Checkpoints(workdir)
    checkpoints.save(0, state, {"batches_consumed": 0, "step": 0})
    checkpoints.close()
    return workdir, exp, jax.device_get(state["params"])


def _task_student(teacher, *extra):
    os.chdir(ROOT)
    return config_lib.load_config("configs/tinybert.py:task_tiny",
                                  [*TASK_STUDENT, f"objective.teacher={teacher}", *extra])


def test_prediction_layer_loss_and_accuracy_match_a_numpy_reference(task_teacher):
    """Both steps' terms on one validation batch of packed rows: the student's class logits
    from ``outputs`` and the teacher's from its own bert_finetune family, then the paper's soft
    cross-entropy (x T^2) and both gold accuracies in NumPy, against the family's sums."""
    from t5x_like.evaluation.loop import device_batches
    from t5x_like.experiment import build

    workdir, t_exp, t_params = task_teacher
    exp = build(_task_student(workdir, "objective.stage=both", "objective.temperature=2.0"))
    params = jax.device_get(exp.init_state()["params"])
    for a, b in zip(jax.tree.leaves(t_params), jax.tree.leaves(params["teacher"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the teacher as its run saved it
    batch = next(device_batches(exp, split="validation", repeat=False, shuffle=False))
    _, sums = jax.jit(exp.family.loss_fn, static_argnames="train")(
        params, batch, jax.random.key(0), train=False)
    s_logits = np.asarray(exp.family.outputs(params, batch), np.float64).reshape(-1, 5)
    t_logits = np.asarray(t_exp.family.outputs(t_params, batch), np.float64).reshape(-1, 5)
    valid = np.asarray(batch["valid"]).reshape(-1) > 0
    labels = np.asarray(batch["label"]).reshape(-1)
    assert valid.sum() > 0 and np.asarray(batch["valid"]).ndim == 2  # packed: slots per row
    t = 2.0
    p_teacher = np.exp(_np_log_softmax(t_logits / t))
    soft = t**2 * -(p_teacher * _np_log_softmax(s_logits / t)).sum(-1)[valid].sum()
    got = {k: float(v) for k, v in sums.items()}
    np.testing.assert_allclose(got["tinybert/soft_cross_entropy"], soft, rtol=1e-5)
    inter = sum(got[f"tinybert/{n}"] for n in ("embedding_mse", "hidden_mse", "attention_mse"))
    assert inter > 0
    np.testing.assert_allclose(got["loss"], soft + inter, rtol=1e-5)
    assert got["weight"] == valid.sum()
    assert got["correct"] == (s_logits.argmax(-1) == labels)[valid].sum()
    assert got["teacher/correct"] == (t_logits.argmax(-1) == labels)[valid].sum()


def test_task_distillation_starts_from_a_general_distillation_student(task_teacher, distilled):
    """``finetune.init_checkpoint`` = a general TinyBERT run: the student's encoder is its
    student, as trained (the prediction step needs no layer pairs, so the 4-layer student may
    learn from the 2-layer teacher)."""
    from t5x_like.experiment import build

    straight = distilled[0]
    exp = build(_task_student(
        task_teacher[0], "objective.stage=prediction", f"finetune.init_checkpoint={straight}",
        "model.num_layers=4", "model.num_heads=8", "model.scan_layers=True"))
    params = jax.device_get(exp.initial_state()["params"])
    _, general, _ = family_runs.checkpoint_params(straight)
    for a, b in zip(jax.tree.leaves(general["student"]["encoder"]),
                    jax.tree.leaves(params["model"]["encoder"]), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(general["student"]["embeddings"]["word_embeddings"],
                                  params["model"]["embeddings"]["word_embeddings"])


def test_task_distillation_bad_settings_are_one_sentence(task_teacher, tmp_path):
    from t5x_like.experiment import build

    workdir = task_teacher[0]
    with pytest.raises(UserError, match="finetune.mode=full"):
        _task_student(workdir, "finetune.mode=lora")
    with pytest.raises(UserError, match="objective.teacher is empty"):
        _task_student("")
    with pytest.raises(UserError, match="not the workdir of a bert_finetune run"):
        build(_task_student(tmp_path))
    with pytest.raises(UserError, match="same finetune.label_names"):
        build(_task_student(workdir, "finetune.label_names=('a','b')"))
