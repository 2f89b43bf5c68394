"""BART against transformers' BartForConditionalGeneration (the oracle): logits, the KV cache,
Hugging Face import/export round trips, specs and config errors."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf, hf_bart
from t5x_like.models import decoder_lm
from t5x_like.models.bart import Bart, BartConfig

VOCAB, PAD, START = 83, 1, 2
SMALL = dict(vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=48, num_encoder_layers=2,
             num_decoder_layers=3, max_position_embeddings=40)
HF_SMALL = dict(vocab_size=VOCAB, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=3,
                max_position_embeddings=40)


def _torch_bart(seed=0, **overrides) -> transformers.BartForConditionalGeneration:
    """Random BART with noise on every parameter and on final_logits_bias (a buffer), so zero
    biases and unit norms cannot hide a wrong mapping."""
    torch.manual_seed(seed)
    config = transformers.BartConfig(**HF_SMALL, dropout=0.0, pad_token_id=PAD,
                                     decoder_start_token_id=START, **overrides)
    model = transformers.BartForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.parameters(), model.final_logits_bias]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _batch(seed=0, enc_len=19, dec_len=14):
    """Encoder rows of different lengths (padded with PAD) and shifted-right decoder inputs."""
    rng = np.random.RandomState(seed)
    enc = rng.randint(3, VOCAB, (3, enc_len))
    enc[1, 12:] = PAD
    enc[2, 5:] = PAD
    dec = rng.randint(3, VOCAB, (3, dec_len))
    dec[:, 0] = START
    return enc, dec


def _hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != PAD),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def _jit_logits(model):
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, e, d: nnx.merge(graphdef, p)(e, d))
    return lambda enc, dec: np.asarray(fn(params, enc, dec))


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory):
    model = _torch_bart(scale_embedding=True)
    folder = tmp_path_factory.mktemp("bart")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_on_padded_inputs(bart_folder, scan_layers):
    torch_model, folder = bart_folder
    model, config = hf.load(folder, scan_layers=scan_layers)
    assert config.scale_embedding and config.pad_token_id == PAD and config.activation == "gelu"
    enc, dec = _batch()
    ours = _jit_logits(model)(enc, dec)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_logits(torch_model, enc, dec), atol=1e-4, rtol=0)


def test_logits_match_transformers_without_embedding_scale(tmp_path):
    torch_model = _torch_bart(seed=1, scale_embedding=False, activation_function="gelu_new")
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, config = hf.load(tmp_path)
    assert not config.scale_embedding and config.activation == "gelu_new"
    enc, dec = _batch(1)
    np.testing.assert_allclose(_jit_logits(model)(enc, dec), _hf_logits(torch_model, enc, dec),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decode_steps_equal_full_decode(bart_folder, scan_layers):
    torch_model, folder = bart_folder
    model, _ = hf.load(folder, scan_layers=scan_layers)
    enc, dec = _batch(2, enc_len=11, dec_len=13)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(p):
        m = nnx.merge(graphdef, p)
        encoded = m.encode(enc)
        stepped = []
        for cross_cached in (False, True):
            cache = m.init_cache(dec.shape[0], dec.shape[1], encoded if cross_cached else None)

            def step(cache, position):
                logits, cache = m.decode_step(encoded, enc, jnp.asarray(dec)[:, position],
                                              cache, position)
                return cache, logits

            _, logits = jax.lax.scan(step, cache, jnp.arange(dec.shape[1]))
            stepped.append(jnp.swapaxes(logits, 0, 1))
        return m.decode(encoded, enc, dec), stepped

    full, stepped = run(params)
    np.testing.assert_allclose(full, _hf_logits(torch_model, enc, dec), atol=1e-4, rtol=0)
    for logits in stepped:
        np.testing.assert_allclose(logits, full, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- interop


def _random_model(config: BartConfig, seed: int = 0) -> Bart:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Bart(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


def _flat(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_then_load_is_bitwise_exact(tmp_path, scan_layers):
    config = BartConfig(**SMALL, scale_embedding=scan_layers, scan_layers=scan_layers)
    model = _random_model(config)
    hf.export(model, config, tmp_path)
    loaded, loaded_config = hf.load(tmp_path, scan_layers=scan_layers)
    assert loaded_config == config
    ours, theirs = _flat(model), _flat(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_transformers_loads_export_with_same_logits(tmp_path):
    config = BartConfig(**SMALL, pad_token_id=PAD, dropout_rate=0.0)
    model = _random_model(config, seed=1)
    hf.export(model, config, tmp_path)
    torch_model = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    enc, dec = _batch(3)
    np.testing.assert_allclose(_jit_logits(model)(enc, dec), _hf_logits(torch_model, enc, dec),
                               atol=1e-4, rtol=0)


def test_bartmodel_weights_without_prefix_load(tmp_path):
    """BartModel checkpoints have no ``model.`` prefix, no head and no final_logits_bias (zero,
    as transformers initialises it)."""
    torch_model = _torch_bart(seed=2)
    with torch.no_grad():
        torch_model.final_logits_bias.zero_()
    torch_model.model.save_pretrained(tmp_path, safe_serialization=True)
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["architectures"] == ["BartModel"]
    model, _ = hf.load(tmp_path, scan_layers=False)
    enc, dec = _batch(4)
    np.testing.assert_allclose(_jit_logits(model)(enc, dec), _hf_logits(torch_model, enc, dec),
                               atol=1e-4, rtol=0)


def test_import_refuses_what_our_bart_cannot_hold(bart_folder):
    _, folder = bart_folder
    base = json.loads((folder / "config.json").read_text())
    with pytest.raises(UserError, match="decoder_attention_heads"):
        hf_bart.config_from_hf({**base, "decoder_attention_heads": 2})
    with pytest.raises(UserError, match="tie_word_embeddings"):
        hf_bart.config_from_hf({**base, "tie_word_embeddings": False})
    with pytest.raises(UserError, match="shape"):
        hf_bart.params_from_hf(hf.hf_common.read_weights(folder),
                               hf_bart.config_from_hf({**base, "encoder_ffn_dim": 40,
                                                       "decoder_ffn_dim": 40}))


# --------------------------------------------------------------------------- config, specs


def test_config_refuses_unknown_keys_and_bad_values():
    assert BartConfig.from_dict({"d_model": 64, "num_heads": 4}).d_kv == 16
    with pytest.raises(UserError, match="num_head"):
        BartConfig.from_dict({"num_head": 4})
    with pytest.raises(UserError, match="divisible"):
        BartConfig(d_model=30, num_heads=4)
    with pytest.raises(UserError, match="activation"):
        BartConfig(activation="tanh")
    with pytest.raises(UserError, match="attention_dropout_rate"):
        BartConfig(attention_dropout_rate=-0.1)
    model = _random_model(BartConfig(**SMALL))
    with pytest.raises(UserError, match="max_position_embeddings"):
        model.encode(np.zeros((1, 41), int))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axis_names(scan_layers):
    config = BartConfig(**SMALL, scan_layers=scan_layers)
    state = nnx.state(nnx.eval_shape(lambda: Bart(config, rngs=nnx.Rngs(0))), nnx.Param)
    specs = {".".join(map(str, p)): tuple(s.get_value())
             for p, s in nnx.to_flat_state(nnx.get_partition_spec(state))}
    params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    known = {"vocab", "embed", "heads", "kv", "mlp", "layers", decoder_lm.POSITION_AXIS}
    assert specs.keys() == params.keys() and len(params) > 20
    for key, param in params.items():
        spec = specs[key]
        assert len(spec) == param.ndim and set(spec) <= known, (key, spec)
        assert (spec[0] == "layers") == (scan_layers and ".layers." in key), (key, spec)
    assert specs["token_embedding"] == ("vocab", "embed")
    assert specs["final_logits_bias"] == ("vocab",)
    assert specs["decoder.position_embedding"] == (decoder_lm.POSITION_AXIS, "embed")
    layer = "decoder.layers." if scan_layers else "decoder.layers.0."
    prefix = ("layers",) if scan_layers else ()
    assert specs[layer + "cross_attention.key"] == (*prefix, "embed", "heads", "kv")
    assert specs[layer + "cross_attention.key_bias"] == (*prefix, "heads", "kv")
    assert specs[layer + "mlp.wo"] == (*prefix, "mlp", "embed")


def test_dropout_key_comes_from_the_call_and_is_off_by_default():
    model = _random_model(BartConfig(**SMALL, dropout_rate=0.2, attention_dropout_rate=0.1,
                                     activation_dropout_rate=0.1))
    enc, dec = _batch(5, enc_len=9, dec_len=7)
    graphdef, params = nnx.split(model, nnx.Param)
    on, off = (jax.jit(lambda p, key, e=e: nnx.merge(graphdef, p)(
        enc, dec, enable_dropout=e, rngs=nnx.Rngs(dropout=key))) for e in (True, False))
    k0, k1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(off(params, k0), off(params, k1))
    np.testing.assert_array_equal(on(params, k0), on(params, k0))
    assert np.abs(on(params, k0) - off(params, k0)).max() > 1e-2
    assert np.abs(on(params, k0) - on(params, k1)).max() > 1e-2
