"""XLNet against transformers' PyTorch XLNetLMHeadModel (the oracle): both streams, perm masks,
target mapping, segments and memory; plus HF round trips, logical axes, dropout, stop-gradient."""

import functools
import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf, hf_xlnet
from t5x_like.models import xlnet
from t5x_like.models.xlnet import XLNet, XLNetConfig
from t5x_like.objectives.permutation import permutation_lm

VOCAB, LENGTH, MEM_LEN, NUM_PREDICT = 120, 16, 12, 5
SEP, CLS, PAD = 4, 3, 0
# initializer_range 0.2 (not 0.02) so attention is far from uniform and the logits are O(1):
# a wrong mask, shift or segment term then moves them by much more than the 1e-4 tolerance.
HF_SMALL = dict(vocab_size=VOCAB, d_model=64, n_layer=2, n_head=4, d_inner=128, mem_len=MEM_LEN,
                dropout=0.0, initializer_range=0.2)


@pytest.fixture(scope="module")
def hf_xlnet_model(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**HF_SMALL)).eval()
    folder = tmp_path_factory.mktemp("xlnet")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _segments(seed=0):
    """Two consecutive segments of 3 rows; the second has SEP/CLS, two segments and padding."""
    rng = np.random.RandomState(seed)
    first = rng.randint(6, VOCAB, (3, LENGTH))
    second = rng.randint(6, VOCAB, (3, LENGTH))
    second[:, 7], second[:, -1] = SEP, CLS
    second[2, 11:] = PAD  # row 2 is padded (its CLS too)
    token_types = np.zeros((3, LENGTH), np.int64)
    token_types[:, 8:] = 1
    return first, second, token_types, (second != PAD).astype(np.int64)


def _torch_mems(mems):
    return np.stack([m.numpy().transpose(1, 0, 2) for m in mems])  # [L, B, D] -> [layers, B, L, D]


def _jit_apply(model):
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, ids, kw: nnx.merge(graphdef, p)(ids, **kw))
    return lambda ids, **kw: fn(params, ids, kw)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_both_streams_with_memory_match_transformers(hf_xlnet_model, scan_layers):
    torch_model, folder = hf_xlnet_model
    model, config = hf.load(folder, scan_layers=scan_layers)
    assert config.mem_len == MEM_LEN and config.d_head == 16
    first, second, token_types, attention_mask = _segments()
    feats = permutation_lm(jax.random.key(1), jnp.asarray(second), num_predict=NUM_PREDICT,
                           special_ids=(SEP, CLS), pad_id=PAD)
    perm_mask, target_mapping = np.asarray(feats["perm_mask"]), np.asarray(feats["target_mapping"])
    with torch.no_grad():
        # Segment 1: plain bidirectional attention, no perm mask (token types, new mems).
        ref1 = torch_model(torch.tensor(first), token_type_ids=torch.tensor(token_types),
                           use_mems=True)
        ref2 = torch_model(
            torch.tensor(second), mems=ref1.mems, perm_mask=torch.tensor(perm_mask, dtype=float),
            target_mapping=torch.tensor(target_mapping), token_type_ids=torch.tensor(token_types),
            attention_mask=torch.tensor(attention_mask), use_mems=True,
            output_hidden_states=True)
    apply = _jit_apply(model)
    out1 = apply(first, token_type_ids=token_types)
    assert out1.logits.shape == (3, LENGTH, VOCAB) and out1.mems.shape == (2, 3, MEM_LEN, 64)
    np.testing.assert_allclose(out1.logits, ref1.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out1.mems, _torch_mems(ref1.mems), atol=1e-4, rtol=0)

    inputs = dict(perm_mask=feats["perm_mask"], target_mapping=feats["target_mapping"],
                  token_type_ids=token_types, attention_mask=attention_mask)
    out2 = apply(second, mems=out1.mems, **inputs)
    assert out2.logits.shape == (3, NUM_PREDICT, VOCAB)
    # hidden_states ends with (content stream h, query stream g) of the last layer.
    np.testing.assert_allclose(out2.logits, ref2.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out2.hidden, ref2.hidden_states[-2].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out2.mems, _torch_mems(ref2.mems), atol=1e-4, rtol=0)
    assert np.abs(out2.logits).max() > 1.0  # O(1) logits: the 1e-4 agreement is not trivial

    # The masks and the memory matter at this scale: without them the logits move far.
    leaky = apply(second, mems=out1.mems, **{**inputs, "perm_mask": jnp.zeros_like(perm_mask)})
    forgetful = apply(second, **inputs)
    weights = np.asarray(feats["target_weights"])[..., None] > 0
    assert np.abs(np.where(weights, leaky.logits - out2.logits, 0)).max() > 0.1
    assert np.abs(np.where(weights, forgetful.logits - out2.logits, 0)).max() > 0.1


def test_query_stream_never_sees_its_own_token(hf_xlnet_model):
    """A hand-made perm mask that leaves a target's own token visible: transformers' query
    stream then reads it; ours does not, and equals transformers given the diagonal."""
    torch_model, folder = hf_xlnet_model
    model, _ = hf.load(folder)
    _, second, _, _ = _segments(1)
    target_mapping = np.zeros((3, 1, LENGTH), np.float32)
    target_mapping[:, 0, 5] = 1.0
    perm_mask = np.zeros((3, LENGTH, LENGTH), np.float32)
    with_diagonal = perm_mask.copy()
    with_diagonal[:, 5, 5] = 1.0
    apply = _jit_apply(model)
    ours = apply(second, perm_mask=perm_mask, target_mapping=target_mapping).logits
    with torch.no_grad():
        def theirs(mask):
            return torch_model(torch.tensor(second), perm_mask=torch.tensor(mask),
                               target_mapping=torch.tensor(target_mapping)).logits.numpy()
        np.testing.assert_allclose(ours, theirs(with_diagonal), atol=1e-4, rtol=0)
        assert np.abs(ours - theirs(perm_mask)).max() > 0.1


def test_reuse_len_clamp_len_relu_match_transformers_and_bf16_is_close(tmp_path):
    """Memory from only the first reuse_len tokens, clamped distances and a ReLU FFN, over two
    segments; bfloat16 compute stays within 5% of the float32 logits' range (a wrong cast or a
    bf16 softmax would be far off)."""
    torch.manual_seed(1)
    config = transformers.XLNetConfig(**{**HF_SMALL, "reuse_len": 8, "clamp_len": 5,
                                         "ff_activation": "relu"})
    torch_model = transformers.XLNetLMHeadModel(config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, ours_config = hf.load(tmp_path)
    assert (ours_config.reuse_len, ours_config.clamp_len) == (8, 5)
    first, second, _, _ = _segments(5)
    with torch.no_grad():
        ref1 = torch_model(torch.tensor(first), use_mems=True)
        ref2 = torch_model(torch.tensor(second), mems=ref1.mems, use_mems=True)
    apply = _jit_apply(model)
    out1 = apply(first)
    out2 = apply(second, mems=out1.mems)
    np.testing.assert_allclose(out1.mems, _torch_mems(ref1.mems), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out2.mems, _torch_mems(ref2.mems), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out2.logits, ref2.logits.numpy(), atol=1e-4, rtol=0)
    bf16 = _jit_apply(hf.load(tmp_path, dtype="bfloat16")[0])(second, mems=out1.mems).logits
    assert bf16.dtype == jnp.float32
    assert np.abs(bf16 - out2.logits).max() <= 0.05 * np.abs(out2.logits).max()


def test_rel_shift_aligns_scores_to_distances():
    """out[i, j] = in[i, T - i + j]: slot r of the encodings is distance klen - r, so query i
    (absolute mlen + i) and key j land on distance mlen + i - j."""
    t, klen = 5, 8
    x = np.random.default_rng(0).normal(size=(2, 3, t, klen + t)).astype(np.float32)
    expected = np.stack([x[:, :, i, t - i: t - i + klen] for i in range(t)], axis=2)
    np.testing.assert_array_equal(xlnet.rel_shift(jnp.asarray(x), klen), expected)
    enc = xlnet.relative_encodings(t, klen, 4, clamp_len=-1)
    assert enc.shape == (klen + t, 4)
    np.testing.assert_allclose(enc[0], [np.sin(klen), np.sin(klen / 100), np.cos(klen),
                                        np.cos(klen / 100)], rtol=1e-6)


# --------------------------------------------------------------------------- our own models

SMALL = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_layers=2, d_ff=48, mem_len=6,
             dropout_rate=0.0)


def _random_model(config: XLNetConfig, seed: int = 0) -> XLNet:
    """An XLNet with random O(0.3) weights, built without compiling the initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: XLNet(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


def _flat(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("scan", [True, False])
def test_export_round_trip_is_exact_and_transformers_agrees(tmp_path, scan):
    config = XLNetConfig(**SMALL, scan_layers=scan)
    model = _random_model(config)
    hf.export(model, config, tmp_path)
    loaded, loaded_config = hf.load(tmp_path, scan_layers=scan)
    assert loaded_config == config
    ours, theirs = _flat(model), _flat(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    if not scan:
        return
    torch_model = transformers.XLNetLMHeadModel.from_pretrained(tmp_path).eval()
    assert torch_model.config.mem_len == 6 and torch_model.config.n_layer == 2
    _, second, token_types, attention_mask = _segments(2)
    with torch.no_grad():
        ref = torch_model(torch.tensor(second), token_type_ids=torch.tensor(token_types),
                          attention_mask=torch.tensor(attention_mask)).logits.numpy()
    out = _jit_apply(model)(second, token_type_ids=token_types, attention_mask=attention_mask)
    np.testing.assert_allclose(out.logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axis_names(scan_layers):
    model = nnx.eval_shape(lambda: XLNet(XLNetConfig(**SMALL, scan_layers=scan_layers),
                                         rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    known = {"vocab", "embed", "heads", "kv", "mlp", "segments", "layers"}
    checked = 0
    for path, param in nnx.to_flat_state(state):
        spec = tuple(specs[path].get_value())
        assert len(spec) == param.ndim and set(spec) <= known, (path, spec)
        assert (spec[0] == "layers") == (scan_layers and "layers" in path), (path, spec)
        checked += 1
    # 3 top-level + per layer 9 attention, 4 feed-forward, 2 x 2 norm (stacked: one set).
    assert checked == len(jax.tree.leaves(state)) == 3 + 17 * (1 if scan_layers else 2)
    flat = {".".join(map(str, p)): tuple(s.get_value()) for p, s in specs.items()}
    assert flat["word_embedding"] == ("vocab", "embed")
    assert flat["lm_bias"] == ("vocab",)
    if scan_layers:
        assert flat["layers.attention.query"] == ("layers", "embed", "heads", "kv")
        assert flat["layers.attention.seg_embed"] == ("layers", "segments", "heads", "kv")
        assert flat["layers.mlp.wi"] == ("layers", "embed", "mlp")


@functools.cache
def _dropout_run():
    model = _random_model(XLNetConfig(**{**SMALL, "dropout_rate": 0.3}), seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    first, second, token_types, _ = _segments(3)
    tm = np.eye(LENGTH, dtype=np.float32)[None, :3].repeat(3, 0)

    @functools.partial(jax.jit, static_argnums=2)
    def run(p, key, enable):
        return nnx.merge(graphdef, p)(second, target_mapping=tm, enable_dropout=enable,
                                      rngs=nnx.Rngs(dropout=key)).logits

    return run, params


def test_dropout_key_comes_from_the_call_and_is_off_by_default():
    run, params = _dropout_run()
    k0, k1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(run(params, k0, False), run(params, k1, False))
    np.testing.assert_array_equal(run(params, k0, True), run(params, k0, True))
    assert np.abs(run(params, k0, True) - run(params, k0, False)).max() > 1e-2
    assert np.abs(run(params, k0, True) - run(params, k1, True)).max() > 1e-2


def test_memory_is_stop_gradient_and_remat_changes_nothing():
    """Gradients through a two-segment step (no remat) equal those with the memory fed as a
    constant (full remat): no gradient reaches the previous segment, and remat changes no
    number. A missing stop-gradient adds the first segment's path and moves the gradients."""
    first, second, token_types, _ = _segments(4)
    params = nnx.to_pure_dict(nnx.state(_random_model(XLNetConfig(**SMALL)), nnx.Param))

    def grads(policy, constant_mems):
        graphdef = nnx.graphdef(_random_model(XLNetConfig(**SMALL, remat_policy=policy)))
        mems = nnx.merge(graphdef, params)(first).mems if constant_mems else None

        def loss(p):
            m = nnx.merge(graphdef, p)
            memory = m(first).mems if mems is None else mems
            return jnp.sum(jnp.tanh(m(second, mems=memory, token_type_ids=token_types).logits))

        return jax.jit(jax.grad(loss))(params)

    through, constant = grads("none", False), grads("full", True)
    assert float(np.abs(through["layers"]["attention"]["key"]).max()) > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 through, constant)


def test_config_refuses_unknown_keys_and_bad_values():
    assert XLNetConfig.from_dict({"d_model": 64, "num_heads": 4}).d_head == 16
    with pytest.raises(UserError, match="d_modle"):
        XLNetConfig.from_dict({"d_modle": 64})
    with pytest.raises(UserError, match="num_heads"):
        XLNetConfig(d_model=64, num_heads=5)
    with pytest.raises(UserError, match="attn_type"):
        XLNetConfig(attn_type="uni")
    with pytest.raises(UserError, match="ff_activation"):
        XLNetConfig(ff_activation="swish")
    with pytest.raises(UserError, match="mem_len"):
        XLNetConfig(mem_len=-1)
    with pytest.raises(UserError, match="bi_data"):
        hf_xlnet.config_from_hf({"model_type": "xlnet", "bi_data": True})
    assert hf_xlnet.config_from_hf({"model_type": "xlnet", "mem_len": None}).mem_len == 0
