"""End to end through the CLI, as a user runs it: train, exact resume, fallback past a corrupt
checkpoint, data parallelism on 8 fake devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES, run_cli
from numerics import assert_close_at_scale


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _train(workdir, *extra):
    result = run_cli(
        "train", "--config", TINY_CONFIG, "--workdir", str(workdir), *TINY_OVERRIDES, *extra
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """20 steps in one process; and 10 steps, process exit, then 10 more in a new process."""
    base = tmp_path_factory.mktemp("resume")
    straight, resumed = base / "straight", base / "resumed"
    _train(straight)
    _train(resumed, "--config.train.num_steps=10")
    second = _train(resumed)
    assert "resumed from step 10" in second.stdout
    return straight, resumed


def _params(workdir):
    from t5x_like.evaluation.driver import load_checkpoint

    _, params, step = load_checkpoint(workdir)
    return jax.device_get(params), step


def test_training_lowers_the_loss(straight_and_resumed):
    straight, _ = straight_and_resumed
    losses = _losses(straight)
    assert sorted(losses) == list(range(1, 21))
    assert np.mean([losses[s] for s in (18, 19, 20)]) < losses[1] - 1.0
    config = json.loads((straight / "config.json").read_text())
    assert config["model"]["vocab_size"] == 8192  # resolved from the 8100-id vocabulary
    assert (straight / "tensorboard").is_dir()


def test_resume_is_bit_identical_and_consumes_the_same_data(straight_and_resumed):
    straight, resumed = straight_and_resumed
    a, step_a = _params(straight)
    b, step_b = _params(resumed)
    assert step_a == step_b == 20
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # Same data and masks after the restart: the per-step losses agree exactly.
    la, lb = _losses(straight), _losses(resumed)
    assert [la[s] for s in range(11, 21)] == [lb[s] for s in range(11, 21)]


def test_several_steps_a_call_are_bit_identical_to_one_step_a_call(straight_and_resumed,
                                                                   tmp_path):
    """``train.steps_per_call=3`` (a lax.scan over 3 batches a call), logging every 4 steps:
    calls of 3 and single steps mix at the boundaries (0-3, 3, 4-7, 7, 8, 9 | resume at 10,
    ...); 10 steps, a new process, 10 more equal the 20 one-step calls bit for bit."""
    straight, _ = straight_and_resumed
    chunked = tmp_path / "chunked"
    extra = ("--config.train.steps_per_call=3", "--config.train.log_every=4")
    _train(chunked, "--config.train.num_steps=10", *extra)
    assert "resumed from step 10" in _train(chunked, *extra).stdout
    a, step_a = _params(straight)
    b, step_b = _params(chunked)
    assert step_a == step_b == 20
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # Logged at 4, 8, 10 (end of the first run), 12, 16, 20: each the mean of its steps.
    per_step, logged = _losses(straight), _losses(chunked)
    assert sorted(logged) == [4, 8, 10, 12, 16, 20]
    for end, first in ((8, 5), (12, 11), (20, 17)):
        expected = np.mean([per_step[s] for s in range(first, end + 1)], dtype=np.float32)
        assert logged[end] == pytest.approx(float(expected), rel=1e-6)


def test_a_corrupt_latest_checkpoint_falls_back_and_says_so(straight_and_resumed, tmp_path, capsys):
    import shutil

    from t5x_like.evaluation.driver import load_checkpoint

    straight, _ = straight_and_resumed
    workdir = tmp_path / "copy"
    shutil.copytree(straight, workdir)
    state_dir = workdir / "checkpoints" / "20" / "state"
    files = sorted((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest = files[-1]
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
    _, _, step = load_checkpoint(workdir)
    assert step == 10
    out = capsys.readouterr().out
    assert "checkpoint step 20" in out and "unreadable" in out and "falling back" in out


def _torch_t5(workdir, out):
    """The checkpoint as transformers' PyTorch T5 (exported, then loaded by transformers)."""
    import transformers

    from t5x_like.interop import checkpoint_io

    checkpoint_io.export_hf(workdir, out)
    return transformers.T5ForConditionalGeneration.from_pretrained(out).eval()


def _torch_log_probs(model, inputs, decoder_inputs):
    import torch

    inputs, decoder_inputs = (torch.tensor(np.asarray(x), dtype=torch.long)
                              for x in (inputs, decoder_inputs))
    with torch.no_grad():
        logits = model(input_ids=inputs, attention_mask=inputs != 0,
                       decoder_input_ids=decoder_inputs).logits
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def _shift_right(targets):
    return np.pad(np.asarray(targets), ((0, 0), (1, 0)))[:, :-1]


def _body(ids):
    """A row without its padding and final EOS (an EOS inside is a document boundary)."""
    ids = list(ids)
    while ids and ids[-1] == 0:
        ids.pop()
    return ids[:-1] if ids and ids[-1] == 1 else ids


def _spans(ids, first_sentinel):
    """{span index: tokens} of a target/output row (sentinel i = vocab_size - 1 - i); a
    repeated sentinel keeps its first span."""
    spans, current = {}, None
    for t in _body(ids):
        if t >= first_sentinel:
            current = first_sentinel + 99 - t
            current = None if current in spans else current
            if current is not None:
                spans[current] = []
        elif current is not None:
            spans[current].append(t)
    return spans


@pytest.fixture(scope="module")
def eval_run(straight_and_resumed, tmp_path_factory):
    """``t5x-like eval --batches 2 --samples 2 --json`` on the 20-step run, its stdout and
    report, and the same checkpoint as transformers' T5."""
    straight, _ = straight_and_resumed
    out = tmp_path_factory.mktemp("eval")
    result = run_cli("eval", "--checkpoint", str(straight), "--batches", "2", "--samples", "2",
                     "--json", str(out / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    return straight, result.stdout, report, _torch_t5(straight, out / "hf")


def test_eval_report_matches_transformers_on_the_same_batches(eval_run):
    """Loss, accuracy and token count of the report against transformers' T5 with the same
    weights, on the same two validation batches masked with the same keys; the unigram
    baseline recomputed in NumPy from its definition (add-one counts of 32 corrupted training
    batches' targets, scored on those validation targets)."""
    from t5x_like.evaluation.driver import load_checkpoint
    from t5x_like.evaluation.loop import EVAL_KEY_SALT, device_batches

    workdir, stdout, report, model = eval_run
    exp, _, step = load_checkpoint(workdir)
    assert report["step"] == step == 20
    key = jax.random.fold_in(exp.root_key, EVAL_KEY_SALT)
    split = exp.config.data.eval_split
    nll, correct, targets_seen = 0.0, 0, []
    for i, batch in zip(range(2), device_batches(exp, split=split, repeat=False, shuffle=False),
                        strict=False):
        f = jax.device_get(exp.family.features(batch, jax.random.fold_in(key, i)))
        targets = np.asarray(f["targets"])
        log_p = _torch_log_probs(model, f["inputs"], _shift_right(targets))
        mask = targets > 0
        nll -= np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0][mask].sum()
        correct += int((log_p.argmax(-1) == targets)[mask].sum())
        targets_seen.append(targets[mask])
    count = sum(t.size for t in targets_seen)
    assert report["tokens"] == count
    np.testing.assert_allclose(report["loss"], nll / count, rtol=1e-4)
    assert abs(report["accuracy"] - correct / count) <= 2 / count  # a near-tie may flip

    counts = np.ones(exp.config.model.vocab_size)
    stream = device_batches(exp, split="train", repeat=True, shuffle=False)
    for i in range(32):
        t = np.asarray(jax.device_get(exp.family.features(next(stream), jax.random.key(i))
                                      ["targets"]))
        counts += np.bincount(t[t > 0], minlength=counts.size)
    log_unigram = np.log(counts / counts.sum())
    baseline = -log_unigram[np.concatenate(targets_seen)].mean()
    np.testing.assert_allclose(report["unigram_loss"], baseline, rtol=1e-9)
    assert f"validation loss     {report['loss']:.4f}" in stdout
    assert f"unigram baseline    {report['unigram_loss']:.4f}" in stdout


def test_eval_samples_are_the_truth_and_the_models_greedy_fills(eval_run):
    """What ``eval --samples`` shows: the truth spans put back into the masked text give the
    original validation tokens; the fills are the greedy output of transformers' T5 with the
    same weights; each span's candidates are its first-token probabilities under that model
    (the first one the greedy fill's own first token); and the CLI prints exactly these."""
    from t5x_like.evaluation.driver import fill_spans, load_checkpoint
    from t5x_like.evaluation.loop import device_batches

    workdir, stdout, _, model = eval_run
    exp, params, _ = load_checkpoint(workdir)
    vocab = exp.vocabulary
    first_sentinel = vocab.vocab_size - 100
    samples = fill_spans(exp, params, num_examples=2)  # the CLI's call
    batch = next(device_batches(exp, split=exp.config.data.eval_split, repeat=False,
                                shuffle=False))
    original = np.asarray(jax.device_get(batch["tokens"]))[:2, :48]
    for sample, raw in zip(samples, original, strict=True):
        inputs, truth, output = sample["input_ids"], sample["target_ids"], sample["output_ids"]
        # The truth is the original text: sentinels replaced by their target spans.
        true_spans = _spans(truth, first_sentinel)
        rebuilt = []
        for t in _body(inputs):
            rebuilt += true_spans.pop(first_sentinel + 99 - t) if t >= first_sentinel else [t]
        assert not true_spans and rebuilt == raw.tolist()
        for i, span in _spans(truth, first_sentinel).items():
            assert f"[{vocab.decode(span)}]" in sample["truth"] and f"<{i}>" in sample["masked"]

        # The fills are transformers' greedy decoding of the same inputs.
        import torch

        ids = torch.tensor([inputs])
        greedy = model.generate(ids, attention_mask=ids != 0, max_new_tokens=len(output),
                                do_sample=False, num_beams=1, decoder_start_token_id=0,
                                eos_token_id=1, pad_token_id=0)[0, 1:].tolist()
        end = output.index(1) + 1 if 1 in output else len(output)
        assert output[:end] == greedy[:end]
        for span in _spans(output, first_sentinel).values():
            assert f"[{vocab.decode(span)}]" in sample["model"]

        # Candidates: the torch model's top 3 after each sentinel of the greedy output.
        log_p = _torch_log_probs(model, [inputs], _shift_right([output]))[0]
        seen = set()
        for position, t in enumerate(output[: end - 1]):
            if t < first_sentinel or (span := first_sentinel + 99 - t) in seen:
                continue
            seen.add(span)
            probs = np.exp(log_p[position + 1][: vocab.vocab_size])
            best = np.argsort(-probs, kind="stable")[:3]
            got = sample["candidates"][span]
            np.testing.assert_allclose([p for _, p in got], probs[best], atol=1e-4)
            assert [piece for piece, _ in got][0] in (
                vocab.tokenizer.id_to_piece(int(output[position + 1])).replace("\u2581", "_"),
                "</s>", f"<{first_sentinel + 99 - output[position + 1]}>")
        assert seen == set(sample["candidates"]) and seen

        # The CLI printed these very lines.
        for field in ("masked", "model", "truth"):
            assert f"{field}:".ljust(8) + f"{sample[field]}" in stdout
        for span, top in sample["candidates"].items():
            assert f"    <{span}> " + "  ".join(f"{p!r} {q:.3f}" for p, q in top) in stdout


def test_mesh_that_does_not_divide_the_devices_is_one_sentence(tmp_path):
    result = run_cli(
        "train",
        "--config",
        TINY_CONFIG,
        "--workdir",
        str(tmp_path / "w"),
        *TINY_OVERRIDES,
        "--config.mesh.data=3",
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices")


DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, os
    import jax
    from jax.sharding import PartitionSpec as P
    from t5x_like import config as config_lib
    from t5x_like.experiment import build
    from t5x_like.train import device_batches, make_train_step

    config = config_lib.load_config(CONFIG, OVERRIDES)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        exp = build(config, devices)
        state = exp.init_state()
        step = make_train_step(exp)
        batches = device_batches(exp, split="train")
        losses = []
        for _ in range(3):
            batch = next(batches)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        out[name] = losses
        if name == "eight":
            out["batch_spec"] = [list(a) if isinstance(a, tuple) else a
                                 for a in batch["tokens"].sharding.spec]
            out["batch_shards"] = len(batch["tokens"].addressable_shards)
            leaves = jax.tree.leaves(state)
            out["replicated"] = all(x.sharding.is_fully_replicated for x in leaves)
            out["param_devices"] = sorted({len(x.sharding.device_set) for x in leaves})
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow  # the data8 mesh of tests/test_sharding.py covers it in the default run
def test_data_parallel_on_8_devices_matches_one_device():
    overrides = [o.removeprefix("--") for o in TINY_OVERRIDES]
    script = f"CONFIG = {TINY_CONFIG!r}\nOVERRIDES = {overrides!r}\n" + DATA_PARALLEL_SCRIPT
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(out["eight"], out["one"], rtol=0, atol=1e-5)
    assert out["batch_shards"] == 8
    assert out["batch_spec"] == [["data", "fsdp"]]
    # Pure data parallelism: every state array is replicated on all 8 devices.
    assert out["param_devices"] == [8]
    assert out["replicated"]


def test_gradient_accumulation_gives_the_same_gradient(tiny_config):
    """Two or four micro-batches sum to the gradient of the whole batch."""
    from t5x_like.experiment import build
    from t5x_like.train import accumulate_gradients, device_batches

    exp = build(tiny_config)
    params = exp.init_state()["params"]
    batch = next(device_batches(exp, split="train"))
    features = exp.family.features(batch, jax.random.key(3))
    key = jax.random.key(4)
    grads = {}
    for accum in (1, 2, 4):
        fn = jax.jit(lambda p, f, k, a=accum: accumulate_gradients(exp.family, p, f, k, a))
        grads[accum] = jax.device_get(fn(params, features, key))
    g1, s1, _ = grads[1]
    assert s1["weight"] > 0
    for accum in (2, 4):
        g, s, _ = grads[accum]
        assert s["weight"] == s1["weight"]
        np.testing.assert_allclose(s["loss"], s1["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1), strict=True):
            assert_close_at_scale(a, b)
