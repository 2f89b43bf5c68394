"""Hugging Face folders <-> our T5: exact round trips, transformers loads our export, bad input."""

import json
import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf
from t5x_like.models.t5 import T5, T5Config

SMALL = dict(vocab_size=96, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_encoder_layers=2,
             num_decoder_layers=3, relative_attention_num_buckets=8,
             relative_attention_max_distance=16)


def _random_model(config: T5Config, seed: int = 0) -> T5:
    """A T5 with random weights, built without compiling the initialisers (fast)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


def _flat(model: T5) -> dict:
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("ffp,tie,scan", [("gated-gelu", False, True), ("relu", True, False)])
def test_export_then_load_is_bitwise_exact(tmp_path, ffp, tie, scan):
    config = T5Config(**SMALL, feed_forward_proj=ffp, tie_word_embeddings=tie, scan_layers=scan)
    model = _random_model(config)
    hf.export(model, config, tmp_path)
    loaded, loaded_config = hf.load(tmp_path, scan_layers=scan)
    assert loaded_config == config
    ours, theirs = _flat(model), _flat(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # The other layer layout holds the same arrays, one per layer.
    other = _flat(hf.load(tmp_path, scan_layers=not scan)[0])
    stacked, listed = (ours, other) if scan else (other, ours)
    np.testing.assert_array_equal(stacked["decoder.layers.mlp.wo"][2],
                                  listed["decoder.layers.2.mlp.wo"])


def test_transformers_loads_export_with_same_logits(tmp_path):
    config = T5Config(**SMALL)
    model = _random_model(config, seed=1)
    hf.export(model, config, tmp_path)
    torch_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    rng = np.random.RandomState(0)
    enc = rng.randint(2, SMALL["vocab_size"], (2, 21))
    enc[1, 13:] = 0
    dec = rng.randint(2, SMALL["vocab_size"], (2, 19))
    dec[:, 0] = 0
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                          decoder_input_ids=torch.tensor(dec)).logits.numpy()
    graphdef, params = nnx.split(model, nnx.Param)
    ours = jax.jit(lambda p: nnx.merge(graphdef, p)(enc, dec))(params)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_bfloat16_safetensors_are_read_without_torch(tmp_path):
    torch.manual_seed(0)
    torch_config = transformers.T5Config(
        num_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        **{k: v for k, v in SMALL.items() if k not in ("num_encoder_layers", "num_decoder_layers")})
    torch_model = transformers.T5ForConditionalGeneration(torch_config).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, config = hf.load(tmp_path, scan_layers=False)
    assert config.num_decoder_layers == 1  # absent -> num_layers, as transformers
    state = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
    np.testing.assert_array_equal(model.token_embedder.embedding[...], state["shared.weight"])
    np.testing.assert_array_equal(
        model.decoder.layers[0].cross_attention.query[...],
        state["decoder.block.0.layer.1.EncDecAttention.q.weight"].T.reshape(
            SMALL["d_model"], SMALL["num_heads"], SMALL["d_kv"]))


def test_pickled_bin_weights_are_refused(tmp_path):
    hf.export(_random_model(T5Config(**SMALL)), T5Config(**SMALL), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(UserError, match="safetensors"):
        hf.load(tmp_path)


def test_missing_or_broken_files_name_the_file(tmp_path):
    config = T5Config(**SMALL)
    hf.export(_random_model(config), config, tmp_path)
    config_file = tmp_path / "config.json"
    text = config_file.read_text()
    config_file.unlink()
    with pytest.raises(UserError, match="config.json"):
        hf.load(tmp_path)
    config_file.write_text(text[:-20])
    with pytest.raises(UserError, match="config.json.*not valid JSON"):
        hf.load(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        hf.load(tmp_path / "nowhere")
    # Weights that do not fit the config are named, not a shape error deep inside JAX.
    config_file.write_text(json.dumps({**json.loads(text), "d_ff": 32}))
    with pytest.raises(UserError, match="wi_0.weight has shape"):
        hf.load(tmp_path)
    config_file.write_text(json.dumps({**json.loads(text), "feed_forward_proj": "gated-silu"}))
    with pytest.raises(UserError, match="feed_forward_proj"):
        hf.load(tmp_path)
    config_file.write_text(text)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        hf.load(tmp_path)


def test_mt5_folder_imports_with_transformers_logits(tmp_path):
    """An mT5 folder (model_type "mt5": T5 v1.1, gated-gelu, untied head) written by
    transformers' MT5ForConditionalGeneration loads through ``hf.load`` and gives its logits."""
    torch.manual_seed(0)
    torch_config = transformers.MT5Config(
        vocab_size=SMALL["vocab_size"], d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2,
        num_decoder_layers=1, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0)
    torch_model = transformers.MT5ForConditionalGeneration(torch_config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mt5"
    model, config = hf.load(tmp_path)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 1)
    assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings
    rng = np.random.RandomState(0)
    enc = rng.randint(2, SMALL["vocab_size"], (2, 9))
    enc[1, 6:] = 0
    dec = rng.randint(2, SMALL["vocab_size"], (2, 7))
    dec[:, 0] = 0
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                          decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(enc, dec)), ref, atol=1e-4, rtol=0)
