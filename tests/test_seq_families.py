"""The autoregressive, permutation and denoising families (GPT, BART, MASS, UniLM, XLNet) through
the real spine: configs and presets, training that lowers the loss, bit-exact resume (GPT
through the CLI, the others in-process), GPT perplexity from ``t5x-like eval`` against an
independent computation, logical axis names, and 8 fake devices (fsdp, tensor) equal to one.
"""

import json
import math
import os
import textwrap

import family_runs
import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli

from t5x_like import config as config_lib
from t5x_like import partitioning
from t5x_like.errors import UserError

CONFIGS = {
    "gpt": "configs/gpt_lm.py",
    "bart": "configs/bart_denoise.py",
    "mass": "configs/mass.py",
    "unilm": "configs/unilm.py",
    "xlnet": "configs/xlnet_plm.py",
}
PRESETS = ("tiny", "small", "base")
# One layer (per stack), width 32: a step takes milliseconds and compiles in seconds.
_DECODER_LM = ["model.d_model=32", "model.num_heads=4", "model.d_kv=8", "model.d_ff=64",
               "model.num_layers=1"]
_SEQ2SEQ = ["model.d_model=32", "model.num_heads=4", "model.d_ff=64",
            "model.num_encoder_layers=1", "model.num_decoder_layers=1"]
MODEL = {
    "gpt": _DECODER_LM,
    "unilm": _DECODER_LM,
    "bart": _SEQ2SEQ,
    "mass": _SEQ2SEQ,
    "xlnet": ["model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.num_layers=1",
              "model.mem_len=16"],
}
RUN = family_runs.RUN


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def overrides(family: str) -> list[str]:
    return MODEL[family] + RUN


def tiny(family: str, *extra: str):
    os.chdir(ROOT)
    return config_lib.load_config(f"{CONFIGS[family]}:tiny", overrides(family) + list(extra))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_config_loads_with_each_preset(family, preset):
    os.chdir(ROOT)
    c = config_lib.load_config(f"{CONFIGS[family]}:{preset}")
    assert c.family == family
    assert c.model.vocab_size == 0  # derived from the vocabulary at build time
    width = {"tiny": 128, "small": 512, "base": 768}[preset]
    assert c.model.d_model == width
    with pytest.raises(UserError, match="unknown preset"):
        config_lib.load_config(f"{CONFIGS[family]}:huge")


def test_objective_defaults_are_the_papers():
    os.chdir(ROOT)
    bart = config_lib.load_config("configs/bart_denoise.py:base").objective
    assert (bart.infill_ratio, bart.poisson_lambda, bart.permute_sentences) == (0.3, 3.0, True)
    assert bart.mask_ratio == bart.delete_ratio == bart.rotate_ratio == 0.0
    mass = config_lib.load_config("configs/mass.py:base").objective
    assert (mass.fragment_ratio, mass.start_at_beginning, mass.start_at_end) == (0.5, 0.2, 0.2)
    unilm = config_lib.load_config("configs/unilm.py:base").objective
    assert (unilm.bidirectional, unilm.seq2seq) == pytest.approx((1 / 3, 1 / 3))
    assert (unilm.left_to_right, unilm.right_to_left) == pytest.approx((1 / 6, 1 / 6))
    xlnet = config_lib.load_config("configs/xlnet_plm.py:base")
    assert xlnet.objective.k == 6.0 and xlnet.model.mem_len == 384


@pytest.mark.parametrize(
    "family, override, message",
    [
        ("bart", "objective.infill_ratio=0.0 objective.permute_sentences=False",
         "applies no noise"),
        ("bart", "objective.infill_ratio=0.6", "infill_ratio must lie in"),
        ("mass", "objective.start_at_end=0.9", "start_at_beginning and start_at_end"),
        ("unilm", "objective.seq2seq=0.5", "mode probabilities"),
        ("xlnet", "objective.k=0.5", "objective.k must lie in"),
        ("xlnet", "model.reuse_len=8", "set reuse_len to 0"),
        ("gpt", "data.inputs_length=2048", "exceeds model.max_length"),
        ("gpt", "objective.name='mlm'", "is not 'causal_lm'"),
    ],
)
def test_bad_objective_settings_are_one_sentence(family, override, message):
    with pytest.raises(UserError, match=message):
        tiny(family, *override.split())


# --------------------------------------------------------------------------- training


# Chance is ln(8192) = 9.01 nats; 20 AdamW steps at 3e-3 learn at least the unigram
# frequencies: measured 0.37 (MASS) to 0.73 (GPT) nats below the start.
MIN_DROP = 0.15


# MASS and UniLM reuse BART's and the decoder LM's modules; each runs in the real loop here
# (MASS's fragment masking, UniLM's three attention masks), as every family does.
@pytest.mark.parametrize("family", ["bart", "xlnet", "unilm", "mass"])
def test_trains_and_resumes_bit_exact_in_process(family, tmp_path, capsys):
    from t5x_like.train import train

    config = tiny(family)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(config, straight)
    assert result["step"] == 20 and np.isfinite(result["eval/loss"])
    assert 0.0 <= result["eval/accuracy"] <= 1.0
    family_runs.restart_from_step_10(straight, resumed)
    train(config, resumed)
    assert "resumed from step 10" in capsys.readouterr().out
    family_runs.check_run(straight, resumed, min_drop=MIN_DROP)
    if family == "unilm":  # every mode shows up in the per-mode metrics of a batch of 8
        assert {f"eval/{m}/cross_entropy" for m in ("bidirectional", "seq2seq")} <= set(result)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, compilation_cache):
    """GPT through the CLI: 20 steps, a restart after step 10, and ``eval`` with --json."""
    base = tmp_path_factory.mktemp("gpt")
    straight, resumed = base / "straight", base / "resumed"
    args = [f"--config.{o}" for o in overrides("gpt")]
    result = run_cli("train", "--config", f"{CONFIGS['gpt']}:tiny", "--workdir", str(straight),
                     *args, env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    family_runs.restart_from_step_10(straight, resumed)
    result = run_cli("train", "--config", f"{CONFIGS['gpt']}:tiny", "--workdir", str(resumed),
                     *args, env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stdout
    report = base / "eval.json"
    result = run_cli("eval", "--checkpoint", str(straight), "--batches", "2", "--no-baseline",
                     "--json", str(report), env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout
    return straight, resumed, json.loads(report.read_text())


def test_gpt_trains_and_resumes_bit_exact_through_the_cli(gpt_run):
    straight, resumed, _ = gpt_run
    family_runs.check_run(straight, resumed, min_drop=MIN_DROP)


def test_gpt_eval_perplexity_is_exp_of_the_mean_cross_entropy(gpt_run):
    """stride = window: disjoint chunks of the validation stream. Recomputed here from the
    corpus text, the vocabulary and the module, with numpy's log-softmax in float64."""
    from flax import nnx

    from t5x_like.data.corpus import default_corpus_texts

    straight, _, report = gpt_run
    exp, params, _ = family_runs.checkpoint_params(straight)
    window = exp.config.data.inputs_length + 1
    num_windows = 2 * exp.config.data.batch_size  # eval --batches 2
    assert (report["window"], report["stride"]) == (window, window)
    stream = []
    for text in default_corpus_texts("validation"):
        stream += exp.vocabulary.encode(text) + [1]  # EOS after every document
        if len(stream) >= window * num_windows:
            break
    chunks = np.asarray(stream[: window * num_windows]).reshape(num_windows, window)
    inputs, targets = chunks[:, :-1], chunks[:, 1:]
    segments = 1 + np.cumsum(inputs == 1, axis=1)  # an EOS opens the next document
    model = nnx.merge(exp.family.graphdef, params)
    logits = np.asarray(model(inputs, segment_ids=segments), np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.mean(np.take_along_axis(log_probs, targets[..., None], -1))
    assert report["perplexity_tokens"] == targets.size
    np.testing.assert_allclose(report["perplexity_nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(report["perplexity"], math.exp(nll), rtol=1e-4)


def test_gpt_sliding_window_scores_each_token_once_and_greedy_decoding_continues(gpt_run):
    """A stride below the window scores every token but the first; ``predict_batch`` equals
    argmax decoding by repeated full forward passes (no cache)."""
    from flax import nnx

    from t5x_like.evaluation.driver import perplexity

    straight, _, report = gpt_run
    exp, params, _ = family_runs.checkpoint_params(straight)
    half = perplexity(exp, params, stride=report["window"] // 2, num_batches=2)
    # Same stream, every token after the first scored, each with >= 16 tokens of context.
    assert half["perplexity_tokens"] == report["window"] * 16 - 1
    assert half["perplexity"] != report["perplexity"]

    prompt = np.asarray([[50, 60, 70, 0], [80, 90, 0, 0]], np.int32)  # right-padded
    out = np.asarray(exp.family.predict_batch(params, {"inputs": prompt}, max_length=6))
    model = nnx.merge(exp.family.graphdef, params)
    for row, ids in zip(out, ([1, 50, 60, 70], [1, 80, 90]), strict=True):
        expect = []
        for _ in range(6):
            token = int(np.argmax(np.asarray(model(np.asarray([ids + expect])))[0, -1]))
            expect.append(token)
            if token == 1:
                break
        assert row.tolist() == expect + [0] * (6 - len(expect))


# --------------------------------------------------------------------------- objectives wired


def _family(family: str, *extra: str):
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families import get_family

    vocabulary = get_vocabulary(None)
    config = config_lib.resolve(tiny(family, *extra), vocabulary.vocab_size)
    return get_family(config, vocabulary)


def _sentences(row: list[int], ends: set[int]) -> list[tuple[int, ...]]:
    out, current = [], []
    for t in row:
        current.append(t)
        if t in ends:
            out.append(tuple(current))
            current = []
    return out + [tuple(current)] * bool(current)


def test_bart_sentence_ends_come_from_the_vocabulary_and_permutation_keeps_sentences():
    """Sentence permutation alone: the noised row holds the same sentences, split where the
    text has '.', '!' or '?' (or at an EOS), in per-row random orders."""
    fam = _family("bart", "objective.infill_ratio=0.0", "data.inputs_length=128")
    vocab = fam.vocabulary
    ends = set(fam.token_ids.sentence_end)
    assert vocab.encode("Go.")[-1] in ends and vocab.encode("Why?")[-1] in ends
    assert vocab.encode("Go,")[-1] not in ends
    assert all(vocab.decode([i]).strip()[-1] in ".!?" for i in ends)
    text = "Stay. Why, sir? I go! Come, come, away. Farewell, good night."
    row = vocab.encode(text) + [1] + vocab.encode("Exit. No more.")
    tokens = np.asarray([row] * 8, np.int32)
    out = fam.features({"tokens": tokens}, jax.random.key(0))
    inputs, targets = np.asarray(out["inputs"]), np.asarray(out["targets"])
    assert (targets == tokens).all() and (np.asarray(out["target_weights"]) == 1).all()
    body = _sentences(row, ends | {1})  # the row does not end in EOS: all of it is body
    assert len(body) == 8  # five sentences, the EOS alone, two more
    orders = set()
    for noised in inputs:
        assert sorted(_sentences(noised.tolist(), ends | {1})) == sorted(body)
        orders.add(tuple(noised.tolist()))
    assert len(orders) > 4  # each row draws its own order


def test_xlnet_memory_is_carried_from_the_previous_batch():
    """The train state carries each row's memory: after a step, layer 0's memory is the
    embedding of that row's last mem_len tokens (the layer's input, no dropout here), and the
    next step's loss is the model run by hand with that memory. Micro-batches split and
    rejoin the memory in row order. The data side (row i of batch t+1 continues row i of
    batch t) is tests/test_pipeline.py::test_continuing_rows_deal_the_stream_in_blocks."""
    from t5x_like import losses
    from t5x_like.experiment import build
    from t5x_like.train import accumulate_gradients, device_batches, make_train_step

    config = tiny("xlnet", "model.dropout_rate=0.0", "objective.consecutive_batches=4")
    exp = build(config)
    assert exp.family.consecutive_batches == 4 and exp.family.raw_length == 32
    state = exp.init_state()
    assert not np.asarray(state["carry"]["mems"]).any()  # zeros before the first batch
    batches = device_batches(exp, split="train")
    first, second = next(batches), next(batches)
    step = make_train_step(exp)
    params0 = jax.device_get(state["params"])
    state, _ = step(state, first)
    mems = np.asarray(state["carry"]["mems"])  # [B, layers, M, d]
    assert mems.shape == (8, 1, 16, 32)
    embedded = params0["word_embedding"][np.asarray(first["tokens"])[:, -16:]]
    np.testing.assert_allclose(mems[:, 0], embedded, rtol=1e-6)

    params = jax.device_get(state["params"])
    key = jax.random.key(5)
    f = jax.device_get(exp.family.features(second, key))
    f["carry"] = {"mems": mems}
    _, sums = exp.family.loss_fn(params, f, key, train=False)
    model = exp.family.model(params)
    out = model(f["inputs"], perm_mask=f["perm_mask"], target_mapping=f["target_mapping"],
                mems=np.swapaxes(mems, 0, 1))
    by_hand = losses.cross_entropy_with_z_loss(out.logits, f["targets"], f["target_weights"])
    np.testing.assert_allclose(sums["cross_entropy"], by_hand["cross_entropy"], rtol=1e-6)
    np.testing.assert_allclose(sums["carry"]["mems"], np.swapaxes(out.mems, 0, 1), rtol=1e-6)
    other = {**f, "carry": {"mems": np.roll(mems, 1, axis=0)}}  # another row's memory
    assert abs(float(exp.family.loss_fn(params, other, key, train=False)[1]["cross_entropy"])
               - float(sums["cross_entropy"])) > 1e-4

    whole = accumulate_gradients(exp.family, params, f, key, 1)
    split = accumulate_gradients(exp.family, params, f, key, 4)
    np.testing.assert_allclose(split[2]["mems"], whole[2]["mems"], rtol=1e-6)
    np.testing.assert_allclose(split[1]["loss"], whole[1]["loss"], rtol=1e-5)


def test_xlnet_memory_is_its_own_checkpoint_item(tmp_path, capsys):
    """The memory is saved and restored bit-exact with the state; evaluation leaves it on
    disk, and a run with another batch size restores the state and starts the memory from
    zeros (with a note) instead of calling the checkpoint unreadable."""
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.experiment import build

    exp = build(tiny("xlnet"))
    state = exp.init_state()
    state["carry"] = {"mems": state["carry"]["mems"] + 0.5}
    ckpt = Checkpoints(tmp_path)
    ckpt.save(1, state, {"batches_consumed": 1})
    ckpt.close()
    assert (tmp_path / "checkpoints/1/carry").is_dir()

    restored, meta = exp.restore(Checkpoints(tmp_path, read_only=True))
    assert meta["batches_consumed"] == 1
    np.testing.assert_array_equal(np.asarray(restored["carry"]["mems"]), 0.5)
    params_only, _ = exp.restore(Checkpoints(tmp_path, read_only=True), carry=False)
    assert "carry" not in params_only

    smaller = build(tiny("xlnet", "data.batch_size=4"))
    resumed, _ = smaller.restore(Checkpoints(tmp_path, read_only=True))
    assert "does not fit this run's batch" in capsys.readouterr().out
    mems = np.asarray(resumed["carry"]["mems"])
    assert mems.shape[0] == 4 and not mems.any()
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(restored["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- axes, devices


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_names_its_logical_axes(family, scan):
    from flax import nnx

    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families import get_family

    config = tiny(family, f"model.scan_layers={scan}")
    vocabulary = get_vocabulary(None)
    fam = get_family(config_lib.resolve(config, vocabulary.vocab_size), vocabulary)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(fam.abstract_params)),
                            is_leaf=is_spec)
    shapes = [x.shape for x in jax.tree.leaves(nnx.to_pure_dict(fam.abstract_params))]
    assert len(specs) == len(shapes) > 10
    for names, shape in zip(specs, shapes, strict=True):
        assert len(names) == len(shape), (names, shape)
        assert all(n in partitioning.LOGICAL_AXES for n in names), names
        assert "layers" not in names[1:] and (names[0] == "layers") <= scan, names
    assert any(names[0] == "layers" for names in specs) == scan


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from t5x_like import config as config_lib
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    out = {}
    for family, (path, overrides) in RUNS.items():
        reference, tokens, initial = None, None, None
        for name, (rules, fsdp, tensor) in [("one", ("dp", 1, 1)), ("fsdp8", ("fsdp", 8, 1)),
                                            ("tensor8", ("tensor", 1, 8))]:
            config = config_lib.load_config(path, overrides + [
                f"mesh.rules={rules}", "mesh.data=1", f"mesh.fsdp={fsdp}",
                f"mesh.tensor={tensor}"])
            exp = build(config, jax.devices()[: fsdp * tensor])
            if tokens is None:  # ordinary ids with an EOS every 6th token on average
                rng = np.random.default_rng(0)
                shape = (exp.config.data.batch_size, exp.family.raw_length)
                t = rng.integers(3, exp.vocabulary.vocab_size - 100, shape, dtype=np.int32)
                tokens = np.where(rng.random(shape) < 1 / 6, 1, t).astype(np.int32)
            if initial is None:  # initialised once, then placed on each mesh
                initial = jax.device_get(exp.init_state())
            state = jax.device_put(initial, exp.state_shardings)
            step = make_train_step(exp)
            losses, moments = [], []
            for _ in range(2):
                state, metrics = step(state, {"tokens": jax.device_put(tokens,
                                                                       exp.batch_sharding)})
                losses.append(float(metrics["loss"]))
                moments.append(adam_moments(jax.device_get(state["opt_state"])))
            run = {"params": flat(jax.device_get(state["params"])), "moments": moments}
            if reference is None:
                reference = run
                opt = config.optimizer
                conditioned = well_conditioned(moments, opt.b2, opt.eps)
            sharded = sum(not x.sharding.is_fully_replicated
                          for x in jax.tree.leaves(state["params"]))
            out[f"{family}/{name}"] = {"losses": losses, "sharded": sharded,
                                       **compare(run, reference, conditioned)}
    print("RESULT" + json.dumps(out))
    """
)
# Widths every mesh axis of 8 divides: d_model 64, 8 heads of 8, d_ff 128, vocab 8192.
WIDE = ["model.d_model=64", "model.num_heads=8", "model.d_ff=128"]


_EIGHT: dict[tuple[str, ...], dict] = {}


def eight_devices(families: tuple[str, ...]) -> dict:
    """Runs SCRIPT once (per process) for ``families`` in a subprocess with 8 fake devices."""
    if families not in _EIGHT:
        runs = {}
        for family in families:
            extra = WIDE + (["model.d_kv=8"] if family in ("gpt", "unilm") else [])
            # No warmup: the schedules start at 0, so a first update would change nothing.
            runs[family] = (f"{CONFIGS[family]}:tiny",
                            overrides(family) + extra + ["optimizer.warmup_steps=0"])
        script = f"RUNS = {runs!r}\n" + family_runs.COMPARE + SCRIPT
        _EIGHT[families] = family_runs.on_8_devices(script, ROOT)
    return _EIGHT[families]


# The decoder LM and XLNet's two-stream module (with its memory carry) in the default run;
# BART's encoder-decoder is T5's shape, which tests/test_sharding.py runs on every mesh, and
# MASS (BART's module) and UniLM (the decoder LM's) add only row-wise objectives, so these
# three run with -m slow (each ~1 CPU-minute here).
MODULES = ("gpt", "xlnet")
OTHERS = ("bart", "mass", "unilm")


@pytest.mark.parametrize(
    "family", [*MODULES, *(pytest.param(f, marks=pytest.mark.slow) for f in OTHERS)])
@pytest.mark.parametrize("mesh", ["fsdp8", "tensor8"])
def test_two_steps_on_8_devices_match_one_device(family, mesh):
    runs = eight_devices(MODULES if family in MODULES else OTHERS)
    one, run = runs[f"{family}/one"], runs[f"{family}/{mesh}"]
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=0, atol=1e-5)
    assert run["losses"][1] < run["losses"][0]
    print(f"{family}/{mesh}: gradient {run['gradient_diff']:.1e} of scale, parameters "
          f"{run['conditioned_diff']:.1e} on {run['conditioned_share']:.0%} of elements "
          f"({run['diff']:.1e} on all)")
    # As the encoder families' check (its docstring says why not every parameter): since the
    # embedding's gradient became a one-hot matmul on several devices, MASS's rare-token rows,
    # whose AdamW update is ill-conditioned, moved by 1.4e-5 on fsdp 8.
    assert run["gradient_diff"] <= family_runs.GRADIENT_BOUND, run
    assert run["conditioned_share"] >= 0.1, run
    assert run["conditioned_diff"] <= 1e-5, run
    assert one["sharded"] == 0
    # The embedding, attention and MLP kernels (at least) are split over the 8 devices.
    assert run["sharded"] >= 6, run
