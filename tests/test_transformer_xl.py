"""Transformer-XL: parity with transformers' deprecated TransfoXL over two segments with the
memory carried (its own layers, embeddings and softmax; see ``_hf_segment``), import/export, the
memory being stop-gradient and used, sliding-window perplexity with the memory, and the family
through the real spine (20 steps, bit-exact resume, 8 fake devices)."""

import os

os.environ.setdefault("USE_TF", "0")

import family_runs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ROOT

import t5x_like  # noqa: F401
from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.interop import hf

transfo_xl = pytest.importorskip("transformers.models.deprecated.transfo_xl")

SMALL = dict(vocab_size=53, cutoffs=[], d_model=16, d_embed=16, n_head=2, d_head=8, d_inner=24,
             div_val=1, n_layer=2, mem_len=7, clamp_len=5, same_length=False, dropout=0.0,
             dropatt=0.0)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch.manual_seed(0)
    model = transfo_xl.TransfoXLLMHeadModel(transfo_xl.TransfoXLConfig(**SMALL)).eval()
    with torch.no_grad():  # weights far from their tiny initial ones: attention that matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("transfo_xl")
    model.save_pretrained(path)
    return model, path


def _hf_segment(model, ids: np.ndarray, mems: list):
    """TransfoXLModel.forward step by step with transformers' own modules (its forward builds
    the position sequence with a ``type_as`` call that fails in 4.57, so the 15 lines of glue
    are repeated here): (log-probabilities [B, T, V], new memory)."""
    tr = model.transformer
    x = torch.tensor(ids).T
    qlen, mlen = x.shape[0], mems[0].shape[0]
    klen = mlen + qlen
    mask = torch.triu(torch.ones(qlen, klen, dtype=torch.bool), diagonal=1 + mlen)[:, :, None]
    pos_seq = torch.arange(klen - 1, -1, -1.0).clamp_(max=tr.clamp_len)
    pos_emb = tr.pos_emb(pos_seq)
    core, hids = tr.word_emb(x), []
    with torch.no_grad():
        for i, layer in enumerate(tr.layers):
            hids.append(core)
            core = layer(core, pos_emb, dec_attn_mask=mask, mems=mems[i])[0]
        new_mems = tr._update_mems(hids, mems, mlen, qlen)
        logp = model.crit(core.transpose(0, 1).reshape(-1, core.shape[-1]))
    return logp.reshape(ids.shape[0], qlen, -1).numpy(), new_mems


def test_two_segments_match_transformers_with_the_memory(hf_model):
    model, path = hf_model
    ours, config = hf.load(path)
    assert (config.mem_len, config.clamp_len, config.d_head) == (7, 5, 8)
    rng = np.random.RandomState(0)
    segments = [rng.randint(0, 53, (2, 5)), rng.randint(0, 53, (2, 5))]
    hf_mems = model.transformer.init_mems(2)  # zeros, as our family's first memory
    mems = jnp.zeros((2, 2, 7, 16))
    for ids in segments:
        want, hf_mems = _hf_segment(model, ids, hf_mems)
        out = ours(ids, mems=mems)
        got = np.asarray(jax.nn.log_softmax(out.logits))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        for layer in range(2):
            np.testing.assert_allclose(np.asarray(out.mems[layer]),
                                       hf_mems[layer].numpy().transpose(1, 0, 2), atol=1e-5)
        mems = out.mems
    # The memory matters: the second segment without it gives other predictions.
    alone = np.asarray(jax.nn.log_softmax(ours(segments[1], mems=jnp.zeros_like(mems)).logits))
    assert np.abs(alone - got).max() > 1e-2


def test_export_round_trip_and_unsupported_layouts(hf_model, tmp_path):
    model, path = hf_model
    ours, config = hf.load(path, scan_layers=False)
    hf.export(ours, config, tmp_path / "out")
    again = transfo_xl.TransfoXLLMHeadModel.from_pretrained(tmp_path / "out").eval()
    theirs, mine = model.state_dict(), again.state_dict()
    assert theirs.keys() == mine.keys()
    for name in theirs:
        np.testing.assert_array_equal(theirs[name].numpy(), mine[name].numpy(), err_msg=name)
    import json

    bad = json.loads((path / "config.json").read_text())
    bad["cutoffs"] = [20]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    (tmp_path / "bad" / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="cutoffs"):
        hf.load(tmp_path / "bad")


def test_memory_is_stop_gradient(hf_model):
    _, path = hf_model
    from flax import nnx

    ours, _ = hf.load(path)
    graphdef, params = nnx.split(ours)
    ids = np.arange(10).reshape(2, 5)

    def loss(mems):
        out = nnx.merge(graphdef, params)(ids, mems=mems)
        return jnp.sum(out.mems ** 2)  # depends on the old memory only through the cache

    g = jax.grad(loss)(jnp.ones((2, 2, 7, 16)))
    assert float(jnp.abs(g).max()) == 0.0


# --------------------------------------------------------------------------- the family

MODEL = ["model.d_model=32", "model.num_heads=4", "model.d_head=8", "model.d_ff=64",
         "model.num_layers=2", "model.mem_len=16"]
OVERRIDES = MODEL + family_runs.RUN


@pytest.mark.slow
def test_presets_load_and_bad_memory_is_one_sentence():
    os.chdir(ROOT)
    for preset in ("tiny", "small", "base"):
        config_lib.load_config(f"configs/transformer_xl.py:{preset}", [])
    with pytest.raises(UserError, match="mem_len"):
        config_lib.load_config("configs/transformer_xl.py:tiny", ["model.mem_len=-1"])


def test_trains_resumes_bit_exact_and_perplexity_uses_the_memory(tmp_path, capsys):
    from t5x_like.evaluation.driver import load_checkpoint, perplexity
    from t5x_like.train import train

    os.chdir(ROOT)
    config = config_lib.load_config("configs/transformer_xl.py:tiny", OVERRIDES)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(config, straight)
    assert result["step"] == 20 and np.isfinite(result["eval/loss"])
    family_runs.restart_from_step_10(straight, resumed)
    train(config, resumed)
    assert "resumed from step 10" in capsys.readouterr().out
    family_runs.check_run(straight, resumed, min_drop=0.15)  # clipping 0.25

    exp, params, _ = load_checkpoint(straight)
    assert exp.family.perplexity_window == 4 * 32 + 1  # four segments a window
    report = perplexity(exp, params, num_batches=1)
    assert report["perplexity_tokens"] == 8 * 4 * 32 and np.isfinite(report["perplexity"])
    # One window scored by hand, segment by segment with the memory carried, agrees.
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 100, (2, 129)).astype(np.int32)
    weights = np.ones_like(tokens, np.float32)
    weights[:, 0] = 0
    got = np.asarray(exp.family.score_batch(params, {"tokens": tokens, "weights": weights}))
    model = exp.family.model(params)
    c = exp.family.model_config
    mems, want = jnp.zeros((c.num_layers, 2, c.mem_len, c.d_model)), 0.0
    for s in range(4):
        out = model(tokens[:, 32 * s:32 * s + 32], mems=mems)
        log_p = np.asarray(jax.nn.log_softmax(out.logits))
        want = want + np.take_along_axis(log_p, tokens[:, 32 * s + 1:32 * s + 33, None],
                                         -1)[..., 0].sum(-1)
        mems = out.mems
    np.testing.assert_allclose(got, want, rtol=1e-5)
    first = np.asarray(model(tokens[:, 96:128]).logits)  # the last segment without memory
    assert np.abs(first - np.asarray(out.logits)).max() > 1e-3


@pytest.mark.slow
def test_two_steps_on_8_devices_match_one_device():
    wide = ["model.d_model=64", "model.num_heads=8", "model.d_ff=128",
            "optimizer.warmup_steps=0"]
    runs = family_runs.two_steps_on_meshes("configs/transformer_xl.py:tiny", OVERRIDES + wide, ROOT)
    for mesh in ("fsdp8", "tensor8"):
        np.testing.assert_allclose(runs[mesh]["losses"], runs["one"]["losses"], rtol=1e-6,
                                   atol=1e-5)
        assert runs[mesh]["diff"] <= 2e-5 and runs[mesh]["sharded"] >= 6, runs[mesh]
    assert runs["one"]["losses"][1] < runs["one"]["losses"][0]
