"""ELMo (configs/elmo.py): the LSTM math against torch.nn.LSTM with copied weights and a NumPy
reference (clipping, residual, padding, both directions, the char CNN), the loss against
NumPy, training through the CLI with a bit-exact resume, ``eval``'s perplexity recomputed in
NumPy, the feature mode (frozen biLM, gamma * softmax mix) and 8 fake devices.
"""

from __future__ import annotations

import json
import os
import textwrap

import family_runs
import jax
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from flax import nnx

from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.models.elmo import CHAR_BOW, CHAR_EOW, Elmo, ElmoConfig, LSTMLayer

SMALL = ["model.proj_dim=16", "model.lstm_dim=32"]
RUN = SMALL + family_runs.RUN[:-1] + ["optimizer.learning_rate=0.01"]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_lstm(x, p, mask, *, reverse, cell_clip, proj_clip):
    """LSTMP in float64, gates i, f, g, o; masked steps keep the state and output 0."""
    b, t, _ = x.shape
    h = np.zeros((b, p["w_proj"].shape[1]))
    c = np.zeros((b, p["w_proj"].shape[0]))
    out = np.zeros((b, t, h.shape[1]))
    for s in (range(t - 1, -1, -1) if reverse else range(t)):
        z = x[:, s] @ p["w_input"] + h @ p["w_hidden"] + p["bias"]
        i, f, g, o = np.split(z, 4, axis=-1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        if cell_clip:
            c_new = np.clip(c_new, -cell_clip, cell_clip)
        h_new = (sigmoid(o) * np.tanh(c_new)) @ p["w_proj"]
        if proj_clip:
            h_new = np.clip(h_new, -proj_clip, proj_clip)
        m = mask[:, s, None]
        h, c = np.where(m, h_new, h), np.where(m, c_new, c)
        out[:, s] = np.where(m, h_new, 0.0)
    return out


def item(d: dict, i: int):
    """Entry i of a layer list (int keys in memory, str keys from a checkpoint)."""
    return d[i] if i in d else d[str(i)]


def params_of(module) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64),
                        nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def test_lstm_layer_equals_torch_lstm_with_projection():
    """Clipping off: one layer, both directions, equals torch.nn.LSTM(proj_size=P) fed the
    same (for the backward direction: reversed) sequence."""
    c = ElmoConfig(vocab_size=10, proj_dim=6, lstm_dim=8, cell_clip=0.0, proj_clip=0.0,
                   init_std=0.3)
    layer = LSTMLayer(5, c, rngs=nnx.Rngs(0))
    p = params_of(layer)
    x = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)
    ones = np.ones((3, 7), bool)
    ref = torch.nn.LSTM(5, 8, proj_size=6, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(torch.tensor(p["w_input"].T))
        ref.weight_hh_l0.copy_(torch.tensor(p["w_hidden"].T))
        ref.bias_ih_l0.copy_(torch.tensor(p["bias"]))
        ref.bias_hh_l0.zero_()
        ref.weight_hr_l0.copy_(torch.tensor(p["w_proj"].T))
        fwd = ref(torch.tensor(x))[0].numpy()
        bwd = ref(torch.tensor(x[:, ::-1].copy()))[0].numpy()[:, ::-1]
    np.testing.assert_allclose(np.asarray(layer(x, ones, reverse=False)), fwd, atol=2e-6)
    np.testing.assert_allclose(np.asarray(layer(x, ones, reverse=True)), bwd, atol=2e-6)
    assert np.allclose(p["bias"][8:16], 1.0) and not p["bias"][:8].any()  # forget bias 1


@pytest.mark.parametrize("encoder", ["embedding",
                                     pytest.param("char_cnn", marks=pytest.mark.slow)])
def test_bilm_hidden_states_equal_a_numpy_reference(encoder):
    """Two layers per direction with clipping (small clips, so they bite), the residual
    around layer 2, trailing padding, the shared token encoder; char CNN by hand."""
    c = ElmoConfig(vocab_size=20, proj_dim=6, lstm_dim=8, cell_clip=0.5, proj_clip=0.3,
                   init_std=0.4, token_encoder=encoder, max_chars=6, char_embed_dim=3,
                   char_filter_widths=(1, 3), char_filter_sizes=(4, 5), highway_layers=1,
                   dropout_rate=0.0)
    model = Elmo(c, rngs=nnx.Rngs(1))
    p = params_of(model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 20, (2, 5)).astype(np.int32)
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    chars = rng.integers(1, 259, (20, 6)).astype(np.int32)
    chars[:, 0], chars[:, 4], chars[:, 5] = CHAR_BOW, CHAR_EOW, 0
    kwargs = {"chars": chars[tokens]} if encoder == "char_cnn" else {}
    got = np.asarray(model.hidden_states(tokens, mask=mask, **kwargs))

    if encoder == "char_cnn":
        cp = p["char_cnn"]
        e = cp["char_embedding"][chars[tokens]]  # [B, T, C, 3]
        pooled = []
        for w, kernel, bias in zip((1, 3), cp["filters"].values(), cp["filter_bias"].values(),
                                   strict=True):
            k = kernel.reshape(w, 3, -1)
            conv = np.stack([np.einsum("btwe,wen->btn", e[:, :, j:j + w], k) + bias
                             for j in range(6 - w + 1)], axis=2)
            pooled.append(conv.max(axis=2))
        y = np.maximum(np.concatenate(pooled, -1), 0)
        z = y @ cp["highway"][0] + cp["highway_bias"][0]
        gate = sigmoid(z[..., 9:])
        y = gate * np.maximum(z[..., :9], 0) + (1 - gate) * y
        x0 = y @ cp["projection"]
    else:
        x0 = p["token_embedding"][tokens]
    expect = [np.concatenate([x0, x0], -1)]
    per_direction = {}
    for name, reverse in (("forward_layers", False), ("backward_layers", True)):
        x, states = x0, []
        for i in range(2):
            y = np_lstm(x, item(p[name], i), mask, reverse=reverse, cell_clip=0.5, proj_clip=0.3)
            x = y + x if i else y
            states.append(x)
        per_direction[name] = states
    expect += [np.concatenate([f, b], -1) for f, b in zip(per_direction["forward_layers"],
                                                         per_direction["backward_layers"],
                                                         strict=True)]
    np.testing.assert_allclose(got, np.stack(expect), atol=1e-5)
    assert np.abs(np.stack(expect)[1:, ..., :6]).max() > 0.29  # the projection clip bites


def tiny(*extra: str):
    os.chdir(ROOT)
    return config_lib.load_config("configs/elmo.py:tiny", RUN + list(extra))


def test_loss_is_the_mean_of_both_directions_cross_entropies():
    from t5x_like.experiment import build

    exp = build(tiny())
    params = jax.device_get(exp.family.init(jax.random.key(0)))
    tokens = np.random.default_rng(2).integers(3, 8000, (2, 9)).astype(np.int32)
    tokens[1, 7:] = 0  # padding at the end of the last row
    f = exp.family.features({"tokens": tokens}, None)
    _, sums = exp.family.loss_fn(params, f, jax.random.key(0), train=False)
    out = exp.family.model(params)(tokens, mask=tokens != 0)
    w, b = np.asarray(params["softmax_kernel"], np.float64), np.asarray(params["softmax_bias"])

    def ce(h, targets, weights):
        logits = np.asarray(h, np.float64) @ w + b
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return float(np.sum(nll * weights)), float(weights.sum())

    valid = tokens != 0
    both = valid[:, 1:] & valid[:, :-1]
    fwd = ce(out["forward"][-1][:, :-1], tokens[:, 1:], both)
    bwd = ce(out["backward"][-1][:, 1:], tokens[:, :-1], both)
    assert fwd[1] == bwd[1] == 2 * 8 - 2
    np.testing.assert_allclose(float(sums["forward/cross_entropy"]), fwd[0], rtol=1e-5)
    np.testing.assert_allclose(float(sums["backward/cross_entropy"]), bwd[0], rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss"]), (fwd[0] + bwd[0]) / 2, rtol=1e-5)
    assert float(sums["weight"]) == fwd[1]


def test_bad_elmo_settings_are_one_sentence():
    with pytest.raises(UserError, match="token_encoder"):
        tiny("model.token_encoder='cnn'")
    with pytest.raises(UserError, match="char_filter"):
        tiny("model.char_filter_sizes=(8,)")
    with pytest.raises(UserError, match="bidirectional_lm"):
        tiny("objective.name='mlm'")
    os.chdir(ROOT)
    with pytest.raises(UserError, match="ELMo is fine-tuned"):
        config_lib.load_config("configs/elmo.py:classify_tiny", ["finetune.mode=lora"])


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


@pytest.fixture(scope="module")
def elmo_run(tmp_path_factory, compilation_cache):
    """configs/elmo.py:tiny through the CLI: 20 steps, a restart after step 10, ``eval``."""
    base = tmp_path_factory.mktemp("elmo")
    straight, resumed = base / "straight", base / "resumed"
    args = [f"--config.{o}" for o in RUN]
    result = run_cli("train", "--config", "configs/elmo.py:tiny", "--workdir", str(straight),
                     *args, env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    family_runs.restart_from_step_10(straight, resumed)
    result = run_cli("train", "--config", "configs/elmo.py:tiny", "--workdir", str(resumed),
                     *args, env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stdout
    report = base / "eval.json"
    result = run_cli("eval", "--checkpoint", str(straight), "--batches", "1", "--no-baseline",
                     "--json", str(report), env=compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout
    return straight, resumed, json.loads(report.read_text())


def test_elmo_trains_and_resumes_bit_exact_through_the_cli(elmo_run):
    straight, resumed, _ = elmo_run
    family_runs.check_run(straight, resumed, min_drop=0.3)


def test_elmo_eval_perplexity_is_the_forward_lm_recomputed_in_numpy(elmo_run):
    """The sliding-window perplexity (stride = window) is exp of the forward LM's mean NLL,
    recomputed from the checkpoint with the NumPy LSTM; the backward perplexity is reported
    beside it."""
    from t5x_like.evaluation.driver import token_stream

    straight, _, report = elmo_run
    exp, params, _ = family_runs.checkpoint_params(straight)
    window = exp.config.data.inputs_length + 1
    assert (report["window"], report["stride"]) == (window, window)
    n = exp.config.data.batch_size  # --batches 1
    stream = token_stream(exp, split="validation", chunk=window, max_chunks=n)
    chunks = np.asarray(stream[: n * window]).reshape(n, window)[:2]  # two windows suffice
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["token_embedding"][chunks]
    ones = np.ones(chunks.shape, bool)
    c = exp.family.model_config
    for i in range(2):
        y = np_lstm(x, item(p["forward_layers"], i), ones, reverse=False, cell_clip=c.cell_clip,
                    proj_clip=c.proj_clip)
        x = y + x if i else y
    logits = x[:, :-1] @ p["softmax_kernel"] + p["softmax_bias"]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, chunks[:, 1:, None], -1)[..., 0]
    scores = exp.family.score_batch(params, {"tokens": chunks,
                                             "weights": np.ones_like(chunks, np.float32)})
    np.testing.assert_allclose(np.asarray(scores), -nll.sum(-1), rtol=1e-5)
    assert report["perplexity_tokens"] == n * (window - 1)
    assert 1.0 < report["perplexity"] < 8192
    assert report["forward/perplexity"] == pytest.approx(report["perplexity"], rel=1e-4)
    assert report["backward/perplexity"] > 1.0


def test_feature_mode_trains_the_mix_and_head_on_a_frozen_bilm(elmo_run, tmp_path):
    """classify_tiny from the pretrained run: the biLM is loaded and never changes; the head
    reads gamma * sum_k softmax(s)_k h_k averaged over the row's tokens."""
    from t5x_like import train as train_lib
    from t5x_like.experiment import build
    from t5x_like.finetune import heads

    straight, _, _ = elmo_run
    os.chdir(ROOT)
    config = config_lib.load_config("configs/elmo.py:classify_tiny", SMALL + [
        f"finetune.init_checkpoint={straight}", "data.inputs_length=16", "data.batch_size=4",
        "optimizer.learning_rate=0.05", "optimizer.warmup_steps=0",
        "optimizer.schedule='constant'"])
    exp = build(config)
    state = exp.initial_state()
    _, pretrained, _ = family_runs.checkpoint_params(straight)
    start = jax.device_get(state["params"])
    for a, b in zip(jax.tree.leaves(start["model"]), jax.tree.leaves(pretrained), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert start["head"]["layer_weights"].shape == (3,)
    batch = next(exp.family.batches(split="train", batch_size=4, shuffle=False, repeat=True,
                                    skip_batches=0, shard_index=0, num_shards=1))
    step = train_lib.make_train_step(exp)
    for _ in range(2):
        state, _ = step(state, batch)
    after = jax.device_get(state["params"])
    for a, b in zip(jax.tree.leaves(after["model"]), jax.tree.leaves(start["model"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(after["head"]["layer_weights"], start["head"]["layer_weights"])
    assert float(after["head"]["gamma"]) != float(start["head"]["gamma"])

    model = exp.family.model(after["model"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    states = np.asarray(model.hidden_states(ids, mask=mask), np.float64)
    w = np.exp(after["head"]["layer_weights"]) / np.exp(after["head"]["layer_weights"]).sum()
    mixed = float(after["head"]["gamma"]) * np.einsum("n,nblh->blh", w, states)
    m = mask[..., None]
    pooled = (mixed * m).sum(1) / m.sum(1)
    expect = pooled @ after["head"]["kernel"] + after["head"]["bias"]
    np.testing.assert_allclose(np.asarray(exp.family.outputs(after, batch)), expect, rtol=1e-4,
                               atol=1e-5)
    assert np.asarray(heads.mix_layers(states, after["head"], -1)).shape == states.shape[1:]


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from t5x_like import config as config_lib
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    out, tokens, initial = {}, None, None
    for name, (rules, fsdp, tensor) in [("one", ("dp", 1, 1)), ("fsdp8", ("fsdp", 8, 1)),
                                        ("tensor8", ("tensor", 1, 8))]:
        config = config_lib.load_config("configs/elmo.py:tiny", OVERRIDES + [
            f"mesh.rules={rules}", "mesh.data=1", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])
        exp = build(config, jax.devices()[: fsdp * tensor])
        if tokens is None:
            rng = np.random.default_rng(0)
            shape = (exp.config.data.batch_size, exp.family.raw_length)
            tokens = rng.integers(3, 8000, shape, dtype=np.int32)
            initial = jax.device_get(exp.init_state())
        state = jax.device_put(initial, exp.state_shardings)
        step = make_train_step(exp)
        losses = []
        for _ in range(2):
            state, metrics = step(state, {"tokens": jax.device_put(tokens, exp.batch_sharding)})
            losses.append(float(metrics["loss"]))
        out[name] = losses
    print("RESULT" + json.dumps(out))
    """)


@pytest.mark.slow
def test_eight_fake_devices_fsdp_and_tensor_equal_one_device():
    overrides = RUN + ["data.batch_size=8", "optimizer.warmup_steps=0"]
    out = family_runs.on_8_devices(f"OVERRIDES = {overrides!r}\n" + SCRIPT, ROOT)
    for name in ("fsdp8", "tensor8"):
        np.testing.assert_allclose(out[name], out["one"], rtol=2e-5)
    assert out["one"][1] < out["one"][0]


def test_char_cnn_reads_each_pieces_utf8_bytes_between_bow_and_eow():
    """The char table the char CNN reads: SentencePiece pieces as spelt (with their
    word-start mark), specials as <id_N>, cut to max_chars; bytes and characters decode."""
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families.elmo import char_table, token_texts

    vocab = get_vocabulary(None)
    texts = token_texts(vocab)
    assert len(texts) == vocab.vocab_size
    piece = vocab.encode("the")[-1]
    assert texts[piece] == vocab.tokenizer.id_to_piece(piece)
    table = char_table(texts, vocab.vocab_size + 92, 8)
    word = [b + 1 for b in texts[piece].encode("utf-8")]
    assert table[piece].tolist() == [CHAR_BOW, *word, CHAR_EOW] + [0] * (6 - len(word))
    long_piece = max(range(vocab.vocab_size), key=lambda i: len(texts[i].encode("utf-8")))
    assert table[long_piece, -1] == CHAR_EOW and not table[vocab.vocab_size:].any()
    byte_texts = token_texts(get_vocabulary(None, kind="byte"))
    assert byte_texts[3 + ord("a")] == "a" and byte_texts[0] == "<id_0>"


@pytest.mark.slow
def test_char_cnn_elmo_trains(tmp_path):
    from t5x_like.train import train

    train(tiny("model.token_encoder='char_cnn'"), tmp_path / "run")
    losses = family_runs.logged_losses(tmp_path / "run")
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in
                                                                   range(1, 6)]) - 0.3
