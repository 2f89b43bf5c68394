"""Longformer: parity with transformers' LongformerModel (padded rows, global tokens), export
that transformers loads, the RoBERTa -> 4,096-position conversion checked against RobertaModel,
the banded attention against a dense NumPy reference (dilated too), memory linear in length
(XLA's own count), and the family through the real spine (20 steps, bit-exact resume, 8 fake
devices)."""

import os

os.environ.setdefault("USE_TF", "0")

import family_runs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT

import t5x_like  # noqa: F401
from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.interop import hf
from t5x_like.interop.hf_longformer import longformer_from_roberta
from t5x_like.models.longformer import banded_attention, extend_positions

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             type_vocab_size=2)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def _inputs(length=45):
    rng = np.random.RandomState(0)
    ids = rng.randint(3, SMALL["vocab_size"], (2, length))
    mask = np.ones_like(ids)
    mask[1, 30:] = 0
    ids[1, 30:] = 1  # pad
    glob = np.zeros_like(ids)
    glob[:, 0] = 1
    glob[0, 5:8] = 1
    glob[1, 20] = 1
    return ids, mask, glob, rng.randint(0, 2, ids.shape)


def _torch(model, ids, mask, glob, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     global_attention_mask=torch.tensor(glob),
                     token_type_ids=torch.tensor(types))


@pytest.fixture(scope="module")
def hf_longformer(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LongformerConfig(**SMALL, max_position_embeddings=80,
                                           attention_window=[8, 8])
    model = transformers.LongformerModel(config).eval()
    path = tmp_path_factory.mktemp("longformer")
    model.save_pretrained(path)
    return model, path


def test_matches_transformers_with_padding_and_global_tokens(hf_longformer):
    model, path = hf_longformer
    ids, mask, glob, types = _inputs()
    ref = _torch(model, ids, mask, glob, types)
    ours, config = hf.load(path)
    assert config.attention_window == 8 and config.pooler and not config.mlm_head
    out = ours(input_ids=ids, attention_mask=mask, global_attention_mask=glob,
               token_type_ids=types)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["last_hidden_state"])[real],
                               ref.last_hidden_state.numpy()[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out["pooled_output"]), ref.pooler_output.numpy(),
                               atol=1e-4, rtol=0)
    # Global tokens matter: without them the states differ well beyond the tolerance.
    local = ours(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert np.abs(np.asarray(local["last_hidden_state"])[real]
                  - ref.last_hidden_state.numpy()[real]).max() > 1e-2


@pytest.mark.slow
def test_jitted_call_with_global_slots_matches_eager(hf_longformer):
    _, path = hf_longformer
    ids, mask, glob, types = _inputs()
    ours, _ = hf.load(path)
    from flax import nnx

    graphdef, params = nnx.split(ours)
    jitted = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(
        a[0], a[1], a[3], global_attention_mask=a[2])["last_hidden_state"])(
        params, ids, mask, glob, types)
    eager = ours(ids, mask, types, global_attention_mask=glob)["last_hidden_state"]
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_export_is_loaded_by_transformers_with_the_same_outputs(hf_longformer, tmp_path):
    model, path = hf_longformer
    ours, config = hf.load(path, scan_layers=False)
    hf.export(ours, config, tmp_path)
    again = transformers.LongformerModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_roberta_extended_to_longer_positions_is_roberta_within_the_window(tmp_path):
    torch.manual_seed(1)
    config = transformers.RobertaConfig(**SMALL, max_position_embeddings=20, pad_token_id=1)
    roberta = transformers.RobertaForMaskedLM(config).eval()
    roberta.save_pretrained(tmp_path / "roberta")
    longformer_from_roberta(tmp_path / "roberta", tmp_path / "lf", max_positions=72,
                            attention_window=32)
    lf = transformers.LongformerForMaskedLM.from_pretrained(tmp_path / "lf").eval()
    table = lf.longformer.embeddings.position_embeddings.weight.detach().numpy()
    old = roberta.roberta.embeddings.position_embeddings.weight.detach().numpy()
    assert table.shape == (74, 32)
    np.testing.assert_array_equal(table[2:20], old[2:])  # 18 learned rows, copied 4 times
    np.testing.assert_array_equal(table[56:74], old[2:])
    ids = np.random.RandomState(0).randint(3, 99, (2, 14))
    with torch.no_grad():
        want = roberta(input_ids=torch.tensor(ids)).logits.numpy()
        got = lf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)  # 14 tokens: one 16-each-side window
    ours, ours_config = hf.load(tmp_path / "lf")
    assert ours_config.max_position_embeddings == 74 and ours_config.mlm_head
    np.testing.assert_allclose(np.asarray(ours(ids)["mlm_logits"]), want, atol=1e-4)
    with pytest.raises(UserError, match="roberta"):
        longformer_from_roberta(tmp_path / "lf", tmp_path / "again")


def test_extend_positions_keeps_the_reserved_rows():
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    new = extend_positions(table, 2, 11)
    np.testing.assert_array_equal(new[:6], table)
    np.testing.assert_array_equal(new[6:10], table[2:])
    np.testing.assert_array_equal(new[10], table[2])


def _dense_reference(q, k, v, key_ok, w, dilation, gk=None, gv=None, gok=None):
    """Every query against every key in float64, with the band |i - j| = dilation * m, m <= w."""
    b, length, n, _ = q.shape
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    band = (np.abs(i - j) <= w * dilation) & ((i - j) % dilation == 0)
    s = np.einsum("blnd,bmnd->bnlm", q, k)
    s = np.where(band[None, None] & key_ok[:, None, None, :], s, -np.inf)
    values = np.broadcast_to(v[:, None], (b, length, length, n, v.shape[-1]))
    if gk is not None:
        g = np.where(gok[:, None, None, :], np.einsum("blnd,bgnd->bnlg", q, gk), -np.inf)
        s = np.concatenate([g, s], -1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnlm,bmnd->blnd", p[..., -length:], v)
    if gk is not None:
        out += np.einsum("bnlg,bgnd->blnd", p[..., :-length], gv)
    del values
    return out


@pytest.mark.parametrize("dilation", [1, 3])
def test_banded_attention_equals_the_dense_band(dilation):
    from t5x_like.models.longformer import _dilate, _undilate

    rng = np.random.default_rng(0)
    w, length = 4, 48
    q, k, v = (rng.normal(size=(2, length, 2, 8)) for _ in range(3))
    key_ok = rng.random((2, length)) > 0.2
    key_ok[:, ::5] = True
    gk, gv = rng.normal(size=(2, 3, 2, 8)), rng.normal(size=(2, 3, 2, 8))
    gok = np.array([[True, True, False], [True, False, False]])
    want = _dense_reference(q, k, v, key_ok, w, dilation, gk, gv, gok)
    d = dilation
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    g = dict(global_k=jnp.repeat(jnp.asarray(gk, jnp.float32), d, 0),
             global_v=jnp.repeat(jnp.asarray(gv, jnp.float32), d, 0),
             global_ok=jnp.repeat(jnp.asarray(gok), d, 0))
    got = _undilate(banded_attention(*(_dilate(a, d) for a in f32), _dilate(jnp.asarray(key_ok),
                                                                           d), w, **g), d)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def _temp_bytes(length: int, attention) -> int:
    shape = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    ok = jax.ShapeDtypeStruct((1, length), jnp.bool_)
    compiled = jax.jit(attention).lower(shape, shape, shape, ok).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_attention_memory_grows_linearly_with_length():
    banded = lambda q, k, v, ok: banded_attention(q, k, v, ok, 64)  # noqa: E731
    small, large = _temp_bytes(1024, banded), _temp_bytes(4096, banded)
    assert 3.0 < large / small < 5.0, (small, large)  # 4x the tokens, ~4x the memory
    assert large < 4096 * 4 * 4096 * 4 / 4  # far below one dense [heads, L, L] score matrix


# --------------------------------------------------------------------------- the family

MODEL = ["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
         "model.num_layers=1", "model.attention_window=16"]
OVERRIDES = MODEL + family_runs.RUN


@pytest.mark.slow
def test_config_presets_load_and_bad_window_is_one_sentence():
    os.chdir(ROOT)
    for preset in ("tiny", "small", "base"):
        c = config_lib.load_config(f"configs/longformer.py:{preset}", [])
        assert c.data.inputs_length + 2 <= c.model.max_position_embeddings
    base = config_lib.load_config("configs/longformer.py:base", [])
    assert (base.data.inputs_length, base.model.attention_window) == (4096, 512)
    with pytest.raises(UserError, match="attention_window"):
        config_lib.load_config("configs/longformer.py:tiny", ["model.attention_window=15"])


def test_trains_and_resumes_bit_exact(tmp_path, capsys):
    from t5x_like.train import train

    os.chdir(ROOT)
    config = config_lib.load_config("configs/longformer.py:tiny", OVERRIDES)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(config, straight)
    assert result["step"] == 20 and 0.0 <= result["eval/accuracy"] <= 1.0
    family_runs.restart_from_step_10(straight, resumed)
    train(config, resumed)
    assert "resumed from step 10" in capsys.readouterr().out
    family_runs.check_run(straight, resumed, min_drop=0.3)


@pytest.mark.slow
def test_two_steps_on_8_devices_match_one_device():
    wide = ["model.hidden_size=64", "model.num_heads=8", "model.intermediate_size=128",
            "objective.static_masking=True", "optimizer.warmup_steps=0"]
    runs = family_runs.two_steps_on_meshes("configs/longformer.py:tiny", OVERRIDES + wide, ROOT)
    for mesh in ("fsdp8", "tensor8"):
        np.testing.assert_allclose(runs[mesh]["losses"], runs["one"]["losses"], rtol=1e-6,
                                   atol=1e-5)
        assert runs[mesh]["diff"] <= 2e-5 and runs[mesh]["sharded"] >= 6, runs[mesh]
    assert runs["one"]["losses"][1] < runs["one"]["losses"][0]
