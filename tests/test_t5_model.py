"""T5 against transformers' PyTorch T5 (the oracle), plus remat, bf16, specs and the KV cache."""

import functools
import os
import re

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from numerics import assert_close_at_scale

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf
from t5x_like.models import layers
from t5x_like.models.t5 import T5, T5Config

# Few buckets and a short max distance, with sequences longer than it, so the exact, the
# log-spaced and the clipped bucket ranges are all exercised at this small size.
SMALL = dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64,
             relative_attention_num_buckets=8, relative_attention_max_distance=20)


def _hf_model(tmp_path, *, feed_forward_proj="gated-gelu", tie=False, seed=0):
    """A random transformers T5, saved as safetensors; returns (torch model, folder)."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        num_layers=2, num_decoder_layers=2, feed_forward_proj=feed_forward_proj,
        dropout_rate=0.0, tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, **SMALL)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model, tmp_path


def _batch(seed=0, enc_len=30, dec_len=27):
    """Encoder rows of different lengths (0 = padding) and shifted-right decoder inputs."""
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, SMALL["vocab_size"], (3, enc_len))
    enc[1, 21:] = 0
    enc[2, 9:] = 0
    dec = rng.randint(2, SMALL["vocab_size"], (3, dec_len))
    dec[:, 0] = 0
    return enc, dec


def _hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def _jit_logits(model):
    """The integrator's pattern: split once, merge inside jax.jit."""
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, e, d: nnx.merge(graphdef, p)(e, d))
    return lambda enc, dec: np.asarray(fn(params, enc, dec))


@pytest.fixture(scope="module")
def v11(tmp_path_factory):
    return _hf_model(tmp_path_factory.mktemp("t5_v11"))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_v11(v11, scan_layers):
    torch_model, folder = v11
    model, config = hf.load(folder, scan_layers=scan_layers)
    assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings
    enc, dec = _batch()
    ours = _jit_logits(model)(enc, dec)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_logits(torch_model, enc, dec), atol=1e-4, rtol=0)


def test_logits_match_transformers_v10_relu_tied(tmp_path):
    torch_model, folder = _hf_model(tmp_path, feed_forward_proj="relu", tie=True, seed=1)
    model, config = hf.load(folder, scan_layers=True)
    assert config.feed_forward_proj == "relu" and config.tie_word_embeddings
    assert not hasattr(model, "lm_head")
    enc, dec = _batch(1)
    np.testing.assert_allclose(_jit_logits(model)(enc, dec), _hf_logits(torch_model, enc, dec),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    rel = np.arange(-400, 401)[None, :]
    for bidirectional in (True, False):
        ours = layers.relative_position_buckets(rel, bidirectional=bidirectional,
                                                num_buckets=num_buckets, max_distance=max_distance)
        theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
            max_distance=max_distance).numpy()
        np.testing.assert_array_equal(ours, theirs)
    # The decoder is causal: every key in the past gets its own distance bucket, the future none.
    causal = layers.relative_position_buckets(np.array([-3, -1, 0, 1, 5]), bidirectional=False,
                                              num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(causal, [3, 1, 0, 0, 0])


def _unstacked(params: dict) -> dict:
    """Stacked (scanned) layer params as the per-layer dict of an unscanned model."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        layers_ = params[stack]["layers"]
        n = jax.tree.leaves(layers_)[0].shape[0]
        out[stack] = {**params[stack],
                      "layers": {i: jax.tree.map(lambda a, i=i: a[i], layers_) for i in range(n)}}
    return out


def _config(**overrides) -> T5Config:
    return T5Config(**{**SMALL, "num_encoder_layers": 2, "num_decoder_layers": 2, **overrides})


@functools.cache
def _init_params() -> dict:
    """Initialised once: eager init compiles per shape, so every variant reuses these."""
    return nnx.to_pure_dict(nnx.state(T5(_config(), rngs=nnx.Rngs(params=0)), nnx.Param))


def _small_model(**overrides) -> T5:
    """The same initial weights under another layout, dtype, remat policy or dropout rate."""
    config = _config(**overrides)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))))
    params = _init_params()
    return nnx.merge(graphdef, params if config.scan_layers else _unstacked(params))


def test_remat_policies_give_same_logits_and_gradients():
    """Remat changes what is stored, never the numbers, with stacked or listed layers. The
    encoder's loss keeps compile time low; the decoder goes through the same ``run_stack``."""
    enc, _ = _batch(2, enc_len=12)
    results = {}
    for policy, scan in (("none", True), ("minimal", True), ("dots", True), ("full", False)):
        graphdef, params = nnx.split(_small_model(remat_policy=policy, scan_layers=scan),
                                     nnx.Param)

        def loss(p, graphdef=graphdef):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, p).encode(enc)))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results[policy] = value, nnx.to_pure_dict(grads)
        if not scan:
            jax.tree.map(assert_close_at_scale, results[policy][1],
                         _unstacked(results["none"][1]))
    ref_loss, ref_grads = results["none"]
    assert float(jnp.abs(ref_grads["encoder"]["layers"]["mlp"]["wo"]).max()) > 0
    np.testing.assert_allclose(results["full"][0], ref_loss, rtol=1e-6)
    for policy in ("minimal", "dots"):
        np.testing.assert_allclose(results[policy][0], ref_loss, rtol=1e-6)
        jax.tree.map(assert_close_at_scale, results[policy][1], ref_grads)


def test_scan_unroll_changes_no_number():
    """Two or three layers a trip of the scanned loop (three of three: fully unrolled; two of
    three: a remainder trip) give the loss and gradients of one layer a trip, under remat.
    (A negative count is refused in one sentence: tests/test_config.py.)"""
    enc, _ = _batch(2, enc_len=12)
    config = _config(num_encoder_layers=3, remat_policy="dots")
    params = nnx.state(T5(config, rngs=nnx.Rngs(params=0)), nnx.Param)
    results = []
    for unroll in (1, 2, 3):
        graphdef = nnx.graphdef(nnx.eval_shape(
            lambda unroll=unroll: T5(_config(num_encoder_layers=3, remat_policy="dots",
                                             scan_unroll=unroll), rngs=nnx.Rngs(0))))

        def loss(p, graphdef=graphdef):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, p).encode(enc)))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        results.append((value, nnx.to_pure_dict(grads)))
    assert float(jnp.abs(results[0][1]["encoder"]["layers"]["mlp"]["wo"][2]).max()) > 0
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-6)
        jax.tree.map(assert_close_at_scale, grads, results[0][1])


def test_scan_unroll_default_is_two_on_one_cpu_device_and_one_on_a_sharded_step():
    """Left open (0), a one-device XLA:CPU step runs two layers a trip (measured faster there);
    a step traced over several devices one (with two, XLA all-reduces the shared position
    bias's gradient inside the loop: t5.T5_CPU_SCAN_UNROLL). Other families keep one."""
    from t5x_like.models import activation_sharding

    class TwoDeviceSharding:
        device_set = frozenset({0, 1})

    enc, _ = _batch(2, enc_len=12)
    model = _small_model(scan_layers=True)

    def unrolls():
        jaxpr = jax.make_jaxpr(lambda e: model.encode(e))(enc)
        return [eqn.params["unroll"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]

    assert unrolls() == [2]
    # step_devices asks for the layout of a scalar; every other activation is left to XLA
    with activation_sharding.resolving(lambda names, shape: None if names else TwoDeviceSharding()):
        assert unrolls() == [1]
    assert layers.scan_unroll(3) == 3 and layers.scan_unroll(0) == 1


def test_dots_policy_keeps_attention_probabilities_not_the_logits(capsys):
    """``dots`` keeps the softmax output for the backward pass (it is not recomputed from the
    logits' matmul); ``minimal`` keeps neither, only the inputs."""
    from t5x_like.models.softmax_attention import softmax_attention

    q = jnp.ones((1, 5, 2, 3))
    for policy in ("dots", "minimal"):
        attend = jax.checkpoint(
            lambda q, k, v: softmax_attention(q, k, v, bias=None, mask=None).sum(),
            policy=layers.REMAT_POLICIES[policy])
        jax.ad_checkpoint.print_saved_residuals(attend, q, q, q)
        saved = capsys.readouterr().out.splitlines()
        probs = [line for line in saved if "f32[1,2,5,5]" in line]
        if policy == "dots":
            assert len(probs) == 1 and "named 'attention_probs'" in probs[0], saved
            assert any("f32[1,2,5,3] output of dot_general" in line for line in saved), saved
        else:
            assert probs == [] and len(saved) == 3, saved


def test_bfloat16_compute_is_close_to_float32():
    """bf16 keeps ~3 significant digits; over 2+2 layers the logits drift by a few percent of
    their range, so the bound is 5% of the largest float32 logit (a wrong cast or a bf16
    softmax would be far off) and the argmax mostly agrees."""
    f32, bf16 = _small_model(), _small_model(dtype="bfloat16")
    enc, dec = _batch(3, enc_len=16, dec_len=12)
    ref, out = _jit_logits(f32)(enc, dec), _jit_logits(bf16)(enc, dec)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) > 0.8
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axis_names(scan_layers):
    model = nnx.eval_shape(lambda: T5(_config(scan_layers=scan_layers), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    known = {"vocab", "embed", "heads", "kv", "mlp", "relpos_buckets", "layers"}
    checked = 0
    for path, param in nnx.to_flat_state(state):
        spec = tuple(specs[path].get_value())
        assert len(spec) == param.ndim and set(spec) <= known, (path, spec)
        assert (spec[0] == "layers") == (scan_layers and "layers" in path), (path, spec)
        checked += 1
    assert checked == len(jax.tree.leaves(state)) > 10
    flat = {".".join(map(str, p)): tuple(s.get_value()) for p, s in specs.items()}
    assert flat["token_embedder.embedding"] == ("vocab", "embed")
    assert flat["lm_head"] == ("embed", "vocab")
    assert flat["encoder.relpos_bias.embedding"] == ("relpos_buckets", "heads")
    if scan_layers:
        assert flat["encoder.layers.attention.query"] == ("layers", "embed", "heads", "kv")
        assert flat["decoder.layers.self_attention.out"] == ("layers", "heads", "kv", "embed")
        assert flat["decoder.layers.mlp.wo"] == ("layers", "mlp", "embed")


def test_init_scales_follow_t5():
    model = _small_model()
    d_model, d_kv = SMALL["d_model"], SMALL["d_kv"]
    assert np.std(model.token_embedder.embedding[...]) == pytest.approx(1.0, rel=0.05)
    assert np.std(model.lm_head[...]) == pytest.approx(d_model**-0.5, rel=0.05)
    assert np.std(model.encoder.layers.attention.query[...]) == pytest.approx(
        (d_model * d_kv) ** -0.5, rel=0.1)
    assert np.std(model.decoder.layers.mlp.wo[...]) == pytest.approx(SMALL["d_ff"] ** -0.5,
                                                                     rel=0.1)


def test_dropout_key_comes_from_the_call_and_is_off_by_default():
    model = _small_model(dropout_rate=0.3)
    enc, dec = _batch(4, enc_len=10, dec_len=7)
    graphdef, params = nnx.split(model, nnx.Param)

    @functools.partial(jax.jit, static_argnums=2)
    def run(p, key, enable):
        return nnx.merge(graphdef, p)(enc, dec, enable_dropout=enable,
                                      rngs=nnx.Rngs(dropout=key))

    # Any key type works; "rbg" keys compile ~4x faster than threefry on CPU (17 dropout sites).
    k0, k1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(run(params, k0, False), run(params, k1, False))
    np.testing.assert_array_equal(run(params, k0, True), run(params, k0, True))
    assert np.abs(run(params, k0, True) - run(params, k0, False)).max() > 1e-2
    assert np.abs(run(params, k0, True) - run(params, k1, True)).max() > 1e-2


def test_explicit_attention_path_equals_dot_product_attention():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    bias = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
    both = jax.jit(lambda *a: (layers.explicit_attention(*a[:3], bias=a[3], mask=a[4]),
                               layers.attention(*a[:3], bias=a[3], mask=a[4])))
    explicit, fused = both(q, k, v, bias, mask)
    np.testing.assert_allclose(explicit, fused, atol=1e-5)


def test_attention_matmuls_take_the_probabilities_in_their_own_layout():
    """In the compiled CPU forward and backward, every product with the [B, N, T, S]
    probabilities (or their gradient) as its right operand contracts their T axis, as laid
    out; contracting S, their minor axis, made YNNPACK transpose each [T, S] block (the
    ``jnp.einsum`` form of ``P V`` and ``dS K``)."""
    from t5x_like.models.softmax_attention import softmax_attention

    q, k, v = (jnp.ones((2, 16, 3, 8)) for _ in range(3))
    loss = lambda q, k, v: jnp.sum(softmax_attention(q, k, v, bias=None, mask=None) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    shapes = dict(re.findall(r"%([\w.-]+) = (f32\[[\d,]+\])", hlo))
    dots = re.findall(r"dot\(%([\w.-]+), %([\w.-]+)\).*?rhs_contracting_dims=\{(\d)\}", hlo)
    on_probabilities = [int(axis) for _, rhs, axis in dots if shapes.get(rhs) == "f32[2,3,16,16]"]
    assert on_probabilities and set(on_probabilities) == {2}, (on_probabilities, dots)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decode_steps_equal_full_decode(scan_layers):
    model = _small_model(scan_layers=scan_layers)
    enc, dec = _batch(5, enc_len=14, dec_len=24)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(p):
        m = nnx.merge(graphdef, p)
        encoded = m.encode(enc)
        full = m.decode(encoded, enc, dec)
        stepped = []
        for cross_cached in (False, True):
            cache = m.init_cache(dec.shape[0], dec.shape[1], encoded if cross_cached else None)

            def step(cache, position):
                logits, cache = m.decode_step(encoded, enc, jnp.asarray(dec)[:, position],
                                              cache, position)
                return cache, logits

            _, logits = jax.lax.scan(step, cache, jnp.arange(dec.shape[1]))
            stepped.append(jnp.swapaxes(logits, 0, 1))
        return full, stepped

    full, stepped = run(params)
    for logits in stepped:
        np.testing.assert_allclose(logits, full, atol=1e-5, rtol=0)


def test_config_refuses_unknown_keys_and_values():
    assert T5Config.from_dict({"d_model": 64}).d_model == 64
    with pytest.raises(UserError, match="d_modle"):
        T5Config.from_dict({"d_modle": 64})
    with pytest.raises(UserError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-silu")
    with pytest.raises(UserError, match="remat_policy"):
        T5Config(remat_policy="some")
