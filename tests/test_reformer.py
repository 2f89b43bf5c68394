"""Reformer: parity with transformers' ReformerModel (causal with padding and two hash rounds;
bidirectional with a chunk after and a chunked feed-forward) given its seeded rotations,
export that transformers loads, reversible layers giving the gradients of stored activations
(dropout on), and the family through the real spine (20 steps, bit-exact resume, 8 devices)."""

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
from flax import nnx

import t5x_like  # noqa: F401
from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.interop import hf
from t5x_like.models.reformer import Reformer, ReformerConfig

SMALL = dict(vocab_size=61, hidden_size=16, num_attention_heads=2, attention_head_size=8,
             feed_forward_size=24, attn_layers=["lsh", "lsh"], axial_pos_embds=False,
             max_position_embeddings=64, num_buckets=4, lsh_attn_chunk_length=8,
             hash_seed=7, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def _hf_model(path, **changes):
    torch.manual_seed(0)
    model = transformers.ReformerModel(transformers.ReformerConfig(**SMALL, **changes)).eval()
    with torch.no_grad():  # weights far from their tiny initial ones
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _rotations(config: ReformerConfig) -> jnp.ndarray:
    """transformers' rotations: torch.randn after manual_seed(hash_seed), the same in every
    layer (it reseeds before each)."""
    torch.manual_seed(config.hash_seed)
    one = torch.randn(config.rotation_shape).numpy()
    return jnp.stack([one] * config.num_layers)


@pytest.mark.parametrize("changes", [
    dict(is_decoder=True, num_hashes=2, lsh_num_chunks_before=1, lsh_num_chunks_after=0),
    pytest.param(dict(is_decoder=False, num_hashes=1, lsh_num_chunks_before=1,
                      lsh_num_chunks_after=1, chunk_size_feed_forward=8),
                 marks=pytest.mark.slow),
], ids=["causal_2_hashes", "bidirectional_chunked_ffn"])
def test_matches_transformers_with_its_seeded_rotations(tmp_path, changes):
    model = _hf_model(tmp_path, **changes)
    ids = np.random.RandomState(0).randint(0, 61, (2, 32))
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids),
                     attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours, config = hf.load(tmp_path)
    assert config.causal == changes["is_decoder"] and config.num_hashes == changes["num_hashes"]
    got = np.asarray(ours(ids, mask, rotations=_rotations(config))["last_hidden_state"])
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    # Other rotations hash differently: the outputs move (the hashes are really used).
    other = np.asarray(ours(ids, mask, hash_key=jax.random.key(1))["last_hidden_state"])
    assert np.abs(other[real] - want[real]).max() > 1e-3


def test_export_is_loaded_by_transformers(tmp_path):
    model = _hf_model(tmp_path / "a", is_decoder=True)
    ours, config = hf.load(tmp_path / "a")
    hf.export(ours, config, tmp_path / "b")
    again = transformers.ReformerModel.from_pretrained(tmp_path / "b")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    import json

    bad = json.loads((tmp_path / "a" / "config.json").read_text())
    bad["attn_layers"] = ["local", "lsh"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="attn_layers"):
        hf.load(tmp_path / "a")


def test_reversible_layers_give_the_gradients_of_stored_activations():
    import dataclasses

    config = ReformerConfig(vocab_size=40, hidden_size=16, num_heads=2, head_dim=8,
                            feed_forward_size=32, num_layers=2, max_position_embeddings=32,
                            num_buckets=4, num_hashes=2, lsh_chunk_length=8,
                            chunk_size_feed_forward=8, hidden_dropout_rate=0.1,
                            attention_dropout_rate=0.1)
    ids = np.random.RandomState(0).randint(0, 40, (2, 32))
    grads, losses = [], []
    for reversible in (True, False):
        c = dataclasses.replace(config, reversible=reversible)
        graphdef, params = nnx.split(Reformer(c, rngs=nnx.Rngs(0)))

        def loss(p, graphdef=graphdef):
            out = nnx.merge(graphdef, p)(ids, hash_key=jax.random.key(3), enable_dropout=True,
                                         rngs=nnx.Rngs(dropout=jax.random.key(4)))
            log_p = jax.nn.log_softmax(out["logits"][:, :-1])
            return -jnp.mean(jnp.take_along_axis(log_p, ids[:, 1:, None], -1))

        value, g = jax.jit(jax.value_and_grad(loss))(params)
        losses.append(float(value))
        grads.append(nnx.to_pure_dict(g))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    flat_r, flat_s = jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])
    assert len(flat_r) == len(flat_s) > 10
    for a, b in zip(flat_r, flat_s, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    assert max(float(jnp.abs(a).max()) for a in flat_r) > 1e-3  # not trivially zero


# --------------------------------------------------------------------------- the family

MODEL = ["model.hidden_size=32", "model.num_heads=2", "model.head_dim=16",
         "model.feed_forward_size=64", "model.num_layers=2", "model.lsh_chunk_length=8",
         "model.chunk_size_feed_forward=16"]
OVERRIDES = MODEL + family_runs.RUN


@pytest.mark.slow
def test_presets_load_and_document_mask_is_refused():
    os.chdir(ROOT)
    for preset in ("tiny", "small", "base"):
        config_lib.load_config(f"configs/reformer.py:{preset}", [])
    with pytest.raises(UserError, match="document_mask"):
        config_lib.load_config("configs/reformer.py:tiny", ["objective.document_mask=True"])


def test_trains_and_resumes_bit_exact(tmp_path, capsys):
    from t5x_like.train import train

    os.chdir(ROOT)
    config = config_lib.load_config("configs/reformer.py:tiny", OVERRIDES)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(config, straight)
    assert result["step"] == 20 and np.isfinite(result["eval/loss"])
    family_runs.restart_from_step_10(straight, resumed)
    train(config, resumed)
    assert "resumed from step 10" in capsys.readouterr().out
    family_runs.check_run(straight, resumed, min_drop=0.3)


@pytest.mark.slow
def test_two_steps_on_8_devices_match_one_device():
    wide = ["model.hidden_size=64", "model.num_heads=8", "model.head_dim=8",
            "model.feed_forward_size=128", "optimizer.warmup_steps=0"]
    runs = family_runs.two_steps_on_meshes("configs/reformer.py:tiny", OVERRIDES + wide, ROOT)
    for mesh in ("fsdp8", "tensor8"):
        np.testing.assert_allclose(runs[mesh]["losses"], runs["one"]["losses"], rtol=1e-6,
                                   atol=1e-5)
        assert runs[mesh]["diff"] <= 2e-5 and runs[mesh]["sharded"] >= 6, runs[mesh]
    assert runs["one"]["losses"][1] < runs["one"]["losses"][0]
