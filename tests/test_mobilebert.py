"""MobileBERT against transformers (the oracle) and through the real training loop.

Parity (float32, 1e-4) of ``MobileBertForPreTraining`` logits built from small random configs
(NoNorm with the shared key/query bottleneck and 3 stacked FFNs; LayerNorm without a bottleneck;
an inverted bottleneck, the teacher's shape), on a padded batch; import/export through
``interop.hf``; then ``configs/mobilebert.py:tiny`` for 20 steps through ``t5x-like train``
(loss falls, bit-exact resume) and ``t5x-like eval``, and on 8 fake devices.
"""

import os

os.environ.setdefault("USE_TF", "0")

import json

import family_runs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT
from flax import nnx

import t5x_like  # noqa: F401  (modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf, hf_mobilebert
from t5x_like.models.mobilebert import MobileBertConfig, MobileBertModel

VOCAB, LENGTH = 50, 10
BASE = dict(vocab_size=VOCAB, embedding_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=24, intra_bottleneck_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_feedforward_networks=3)
CASES = {
    "no_norm_bottleneck": BASE,
    # LayerNorm (two sites use torch's eps 1e-5), no bottleneck, one FFN, no trigram.
    "layer_norm_plain": {**BASE, "normalization_type": "layer_norm", "use_bottleneck": False,
                         "num_feedforward_networks": 1, "trigram_input": False,
                         "hidden_act": "gelu", "classifier_activation": False},
    # The IB-BERT teacher's shape: the bottleneck wider than the inter-block width, q/k/v all
    # from it.
    "inverted_bottleneck": {**BASE, "intra_bottleneck_size": 64, "use_bottleneck_attention": True,
                            "key_query_shared_bottleneck": False},
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale weights (HF's 0.02 init makes every logit ~0 and hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "LayerNorm.weight" in name else 0.3 * noise)
    return model.eval()


def _batch(vocab: int = VOCAB):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, vocab, (3, LENGTH))
    mask = np.ones((3, LENGTH), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


class _Saved(dict):
    """case -> (torch model, its save_pretrained folder), built on first use."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, name):
        model = _randomize(transformers.MobileBertForPreTraining(
            transformers.MobileBertConfig(**CASES[name])), seed=list(CASES).index(name))
        folder = self.factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        self[name] = (model, folder)
        return self[name]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _Saved(tmp_path_factory)


def _compare(torch_model, ours, ids, mask, types):
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          token_type_ids=torch.tensor(types), output_hidden_states=True)
    got = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types),
               output_hidden_states=True)
    real = mask.astype(bool)  # padded positions are not compared (their values are arbitrary)
    np.testing.assert_allclose(np.asarray(got["mlm_logits"])[real],
                               ref.prediction_logits.numpy()[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got["nsp_logits"]), ref.seq_relationship_logits.numpy(),
                               atol=1e-4, rtol=1e-4)
    # NoNorm does not normalise, so hidden states grow to ~1e2 with unit-scale weights: their
    # float32 rounding is relative to that scale (the logits above are held to 1e-4 as they are).
    for ours_h, ref_h in zip(np.asarray(got["hidden_states"]), ref.hidden_states, strict=True):
        ref_h = ref_h.numpy()[real]
        scale = max(1.0, float(np.abs(ref_h).max()))
        np.testing.assert_allclose(ours_h[real], ref_h, atol=1e-5 * scale, rtol=1e-4)


# The default run keeps MobileBERT's own shape (NoNorm, bottleneck, stacked FFNs), scanned.
@pytest.mark.parametrize("case,scan", [
    ("no_norm_bottleneck", True),
    *(pytest.param(c, s, marks=pytest.mark.slow) for c in CASES for s in (True, False)
      if (c, s) != ("no_norm_bottleneck", True))])
def test_logits_match_transformers_on_a_padded_batch(saved, case, scan):
    torch_model, folder = saved[case]
    model, config = hf.load(folder, scan_layers=scan)
    assert isinstance(config, MobileBertConfig) and config.mlm_head and config.nsp_head
    _compare(torch_model, model, *_batch())


def test_export_loads_in_transformers_with_the_same_logits(saved, tmp_path):
    torch_model, folder = saved["no_norm_bottleneck"]
    model, config = hf.load(folder)
    hf.export(model, config, tmp_path / "out")
    again = transformers.MobileBertForPreTraining.from_pretrained(tmp_path / "out").eval()
    _compare(again, model, *_batch())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["MobileBertForPreTraining"]
    # A bare encoder (MobileBertModel) imports too: no heads.
    bare = tmp_path / "bare"
    torch_model.mobilebert.save_pretrained(bare, safe_serialization=True)
    model, config = hf.load(bare)
    assert not config.mlm_head and not config.nsp_head
    ids, mask, types = _batch()
    with torch.no_grad():
        ref = torch_model.mobilebert(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask),
                                     token_type_ids=torch.tensor(types))
    got = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(got["pooled_output"]), ref.pooler_output.numpy(),
                               atol=1e-4, rtol=1e-4)


def _count(config: MobileBertConfig) -> int:
    abstract = nnx.eval_shape(lambda: MobileBertModel(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))


def test_parameter_counts_equal_transformers():
    """MobileBERT as published (24 layers, 512 / 128, 4 FFNs): the encoder has 24.8M parameters
    (the paper's table says 25.3M), the pretraining heads add the (H - E) x V decoder rows."""
    config = transformers.MobileBertConfig()
    with torch.device("meta"):
        full = transformers.MobileBertForPreTraining(config)
        bare = transformers.MobileBertModel(config)
    # transformers counts the tied decoder once (it is the word table); ours holds no copy.
    assert _count(MobileBertConfig()) == sum(p.numel() for p in full.parameters())
    encoder = _count(MobileBertConfig(mlm_head=False, nsp_head=False))
    assert encoder == sum(p.numel() for p in bare.parameters()) == 24_844_544


def test_bad_configs_are_one_sentence():
    with pytest.raises(UserError, match="not divisible by num_heads"):
        MobileBertConfig(intra_bottleneck_size=30, num_heads=4)
    with pytest.raises(UserError, match="normalization_type"):
        MobileBertConfig(normalization_type="batch_norm")
    with pytest.raises(UserError, match="E <= H"):
        MobileBertConfig(embedding_size=64, hidden_size=32, intra_bottleneck_size=16)
    with pytest.raises(UserError, match="unknown mobilebert config key"):
        MobileBertConfig.from_dict({"hidden": 3})
    with pytest.raises(UserError, match="cannot override"):
        hf_mobilebert.config_from_hf({"model_type": "mobilebert"}, mlm=True, nsp=True,
                                     hidden_size=8)


# --------------------------------------------------------------------------- the real loop

RUN = [f"--config.{o}" for o in [*family_runs.RUN, "model.scan_layers=True"]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def _cli(*argv: str) -> str:
    return family_runs.cli_in_process(ROOT, *argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache):
    """``configs/mobilebert.py:tiny``: 20 steps, the same run resumed after step 10, eval."""
    base = tmp_path_factory.mktemp("mobilebert")
    straight, resumed = base / "straight", base / "resumed"
    command = ["train", "--config", "configs/mobilebert.py:tiny"]
    _cli(*command, "--workdir", str(straight), *RUN)
    family_runs.restart_from_step_10(straight, resumed)
    log = _cli(*command, "--workdir", str(resumed), *RUN)
    report = base / "eval.json"
    _cli("eval", "--checkpoint", str(straight), "--batches", "2", "--json", str(report))
    return straight, resumed, log, json.loads(report.read_text())


def test_tiny_trains_resumes_bit_exact_and_evaluates(tiny_run):
    straight, resumed, log, report = tiny_run
    assert "resumed from step 10" in log
    family_runs.check_run(straight, resumed, min_drop=0.3)
    assert report["step"] == 20 and report["tokens"] > 0
    for name in ("accuracy", "nsp/accuracy"):
        assert 0.0 <= report[name] <= 1.0
    _, params, _ = family_runs.checkpoint_params(straight)
    layers = params["layers"]
    assert layers["bottleneck"]["kernel"].shape == (2, 64, 32)  # H -> B, stacked over 2 layers
    assert len(layers["ffns"]) == 1  # 2 stacked FFNs: 1 extra + the last
    assert set(params["embeddings"]["norm"]) == {"scale", "bias"}  # NoNorm's


@pytest.mark.slow
def test_export_hf_of_a_trained_run_loads_in_transformers(tiny_run, tmp_path):
    straight = tiny_run[0]
    _cli("export-hf", str(straight), str(tmp_path / "hf"))
    torch_model = transformers.MobileBertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    from t5x_like.evaluation.driver import load_checkpoint

    exp, params, _ = load_checkpoint(straight)
    _compare(torch_model, exp.family.model(jax.device_get(params)), *_batch(vocab=1000))


@pytest.mark.slow
def test_progressive_knowledge_transfer_moves_one_layer_at_a_time(tmp_path, cache):
    """An IB-BERT teacher (10 steps), then PKT stages 1 and 2 of the student: each lowers its
    layer's transfer loss and leaves every other parameter as it was."""
    teacher = tmp_path / "teacher"
    short = [*RUN, "--config.train.num_steps=10", "--config.train.checkpoint_every=10",
             "--config.train.eval_batches=0"]
    _cli("train", "--config", "configs/mobilebert.py:tiny_teacher", "--workdir", str(teacher),
         *short)
    previous = None
    for layer in (1, 2):
        workdir = tmp_path / f"pkt{layer}"
        extra = [f"--config.objective.teacher={teacher}", f"--config.objective.pkt_layer={layer}"]
        if previous:
            extra.append(f"--config.objective.init_student={previous}")
        _cli("train", "--config", "configs/mobilebert.py:tiny_pkt", "--workdir", str(workdir),
             *RUN, "--config.train.eval_batches=0", *extra)
        losses = family_runs.logged_losses(workdir)
        assert np.mean([losses[s] for s in range(16, 21)]) < np.mean(
            [losses[s] for s in range(1, 6)])
        _, after, _ = family_runs.checkpoint_params(workdir)
        if previous is None:  # stage 1 starts from the teacher's embeddings and heads
            _, t, _ = family_runs.checkpoint_params(teacher)
            np.testing.assert_array_equal(after["student"]["embeddings"]["word_embeddings"],
                                          t["embeddings"]["word_embeddings"])
        else:
            _, before, _ = family_runs.checkpoint_params(previous)
            a, b = after["student"]["layers"], before["student"]["layers"]
            np.testing.assert_array_equal(a["query"][0], b["query"][0])  # layer 1 frozen
            assert not np.array_equal(a["query"][1], b["query"][1])  # layer 2 moved
            np.testing.assert_array_equal(after["student"]["embeddings"]["word_embeddings"],
                                          before["student"]["embeddings"]["word_embeddings"])
        previous = workdir
    # Pretraining continues from the transferred student.
    _cli("train", "--config", "configs/mobilebert.py:tiny", "--workdir", str(tmp_path / "pre"),
         *short, f"--config.objective.init_student={previous}")


@pytest.mark.slow
def test_two_steps_on_8_devices_match_one_device():
    # Widths every mesh axis of 8 divides: H 64, B 32, 8 heads of 4, FFN 64, E 16.
    overrides = [*family_runs.RUN, "model.scan_layers=True", "model.num_heads=8",
                 "objective.static_masking=True", "optimizer.warmup_steps=0"]
    runs = family_runs.two_steps_on_meshes("configs/mobilebert.py:tiny", overrides, ROOT)
    one = runs["one"]
    for mesh in ("fsdp8", "tensor8"):
        run = runs[mesh]
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5, atol=1e-5)
        assert run["losses"][1] < run["losses"][0]
        assert run["diff"] <= 2e-5, (mesh, run["diff"])
        assert run["sharded"] >= 6, run
    assert one["sharded"] == 0


# ------------------------------------------------------------- pre-training distillation


def test_mlm_kd_matches_a_numpy_reference():
    """KL(p_teacher || p_student) of the MLM distributions, summed over the scored slots."""
    from t5x_like.families.mobilebert import mlm_kd

    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 2, 11)) * 3.0
    weights = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p = np.exp(log_softmax(teacher))
    kl = (p * (np.log(p) - log_softmax(student))).sum(-1)
    got = mlm_kd(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights))
    np.testing.assert_allclose(float(got), (kl * weights).sum(), rtol=1e-5)
    assert float(mlm_kd(jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(weights))) < 1e-6
    # The gradient reaches the student only.
    g_s, g_t = jax.grad(lambda s, t: mlm_kd(s, t, jnp.asarray(weights)), argnums=(0, 1))(
        jnp.asarray(student), jnp.asarray(teacher))
    assert float(jnp.abs(g_s).sum()) > 0 and float(jnp.abs(g_t).sum()) == 0


@pytest.fixture(scope="module")
def ib_teacher(tmp_path_factory, cache):
    """An IB-BERT teacher (``:tiny_teacher``) saved as a run at step 0: the student needs only
    its MLM distributions, and no train step compiles for it."""
    from t5x_like import config as config_lib

    os.chdir(ROOT)
    config = config_lib.load_config("configs/mobilebert.py:tiny_teacher",
                                    [*family_runs.RUN, "model.scan_layers=True"])
    return family_runs.step_zero_workdir(
        config, tmp_path_factory.mktemp("mobilebert_pd") / "ib_teacher")


@pytest.mark.slow
def test_pretraining_distillation_trains_and_evaluates(ib_teacher, tmp_path):
    """``:tiny_pd`` for 20 steps through ``t5x-like train``: the loss falls, the teacher stays
    as saved, the logged loss is 0.5 MLM + 0.5 KL + NSP of the logged means, and ``eval``
    reports the KL."""
    workdir = tmp_path / "pd"
    _cli("train", "--config", "configs/mobilebert.py:tiny_pd", "--workdir", str(workdir), *RUN,
         f"--config.objective.teacher={ib_teacher}")
    losses = family_runs.logged_losses(workdir)
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean(
        [losses[s] for s in range(1, 6)]) - 0.3, losses
    report = tmp_path / "eval.json"
    _cli("eval", "--checkpoint", str(workdir), "--batches", "1", "--no-baseline", "--json",
         str(report))
    r = json.loads(report.read_text())
    assert r["step"] == 20 and r["pd/kl"] > 0 and 0.0 <= r["nsp/accuracy"] <= 1.0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    row = next(x for x in rows if "train/pd/kl" in x)  # one batch a step: the means are exact
    np.testing.assert_allclose(row["train/loss"], 0.5 * row["train/cross_entropy"]
                               + 0.5 * row["train/pd/kl"] + row["train/nsp/cross_entropy"],
                               rtol=1e-5)
    _, params, _ = family_runs.checkpoint_params(workdir)
    _, saved, _ = family_runs.checkpoint_params(ib_teacher)
    assert set(params) == {"student", "teacher"}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(params["teacher"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pretraining_distillation_bad_settings_are_one_sentence(tmp_path):
    from t5x_like import config as config_lib
    from t5x_like.experiment import build

    os.chdir(ROOT)
    with pytest.raises(UserError, match="pd_alpha must lie in"):
        config_lib.load_config("configs/mobilebert.py:tiny_pd",
                               [f"objective.teacher={tmp_path}", "objective.pd_alpha=1.5"])
    with pytest.raises(UserError, match="objective.teacher is empty"):
        config_lib.load_config("configs/mobilebert.py:tiny_pd", ["objective.teacher="])
    with pytest.raises(UserError, match="not the workdir of a mobilebert run"):
        build(config_lib.load_config("configs/mobilebert.py:tiny_pd",
                                     [f"objective.teacher={tmp_path}"]))
