"""The GPT-style decoder LM against transformers (GPT-2; GPT-NeoX for rotary positions; Llama for
RMSNorm + SwiGLU), plus its KV cache, packed segments, custom masks, specs and GPT-2 interop."""

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
from t5x_like.interop import hf, hf_gpt2
from t5x_like.models import decoder_lm
from t5x_like.models.decoder_lm import DecoderLM, DecoderLMConfig

VOCAB, D, HEADS, FF, LAYERS, MAX_LEN = 97, 32, 4, 48, 2, 40
SMALL = dict(vocab_size=VOCAB, d_model=D, num_heads=HEADS, d_kv=D // HEADS, d_ff=FF,
             num_layers=LAYERS, max_length=MAX_LEN)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter, so zero biases and unit norms cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _gpt2(seed=0, **overrides) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=FF,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    return _perturb(transformers.GPT2LMHeadModel(config), seed)


def _torch_logits(model, ids, **kwargs) -> np.ndarray:
    kwargs = {k: torch.tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()


def _jit(model, method=None):
    """The integrator's pattern: split once, merge inside jax.jit."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(p, *args, **kwargs):
        m = nnx.merge(graphdef, p)
        return (method(m) if method else m)(*args, **kwargs)

    return lambda *a, **k: jax.tree.map(np.asarray, run(params, *a, **k))


def _random_model(config: DecoderLMConfig, seed: int = 0, std: float = 0.2) -> DecoderLM:
    """A model with random weights everywhere (biases, norms too), without compiling inits."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, std, x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


def _ids(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    model = _gpt2()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


# --------------------------------------------------------------------------- GPT-2 parity


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gpt2_logits_match_transformers_on_a_padded_batch(gpt2_folder, scan_layers):
    torch_model, folder = gpt2_folder
    model, config = hf.load(folder, scan_layers=scan_layers)
    assert config.activation == "gelu_new" and config.tie_word_embeddings
    ids = _ids((3, 21))
    keep = np.ones_like(ids)
    keep[1, 13:] = 0
    keep[2, 6:] = 0
    ours = _jit(model)(ids, segment_ids=keep)  # segment 0 = padding
    assert ours.dtype == np.float32
    ref = _torch_logits(torch_model, ids, attention_mask=keep)
    real = keep.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_and_cached_steps_equal_the_full_forward(gpt2_folder, scan_layers):
    """A left-padded and a full row: prompt by ``prefill``, the rest one ``decode_step`` at a
    time, against transformers' full forward (positions counting real tokens only)."""
    torch_model, folder = gpt2_folder
    model, _ = hf.load(folder, scan_layers=scan_layers)
    ids, prompt = _ids((2, 17), seed=1), 7
    valid = np.ones_like(ids)
    valid[1, :3] = 0  # left padding
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    ref = _torch_logits(torch_model, ids, attention_mask=valid, position_ids=positions)

    def generate(m, ids, valid):
        cache = m.init_cache(ids.shape[0], ids.shape[1])
        first, cache = m.prefill(ids[:, :prompt], cache, valid=valid[:, :prompt])

        def step(cache, position):
            logits, cache = m.decode_step(ids[:, position], cache, position)
            return cache, logits

        _, rest = jax.lax.scan(step, cache, jnp.arange(prompt, ids.shape[1]))
        return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)

    stepped = _jit(model, lambda m: lambda *a: generate(m, *a))(ids, valid)
    full = _jit(model)(ids, segment_ids=valid)  # left padding = segment 0, positions restart
    real = valid.astype(bool)
    np.testing.assert_allclose(stepped[real], ref[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(full[real], ref[real], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- GPT-2 interop


def _flat(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gpt2_export_then_load_is_bitwise_exact(tmp_path, scan_layers):
    config = DecoderLMConfig(**SMALL, scan_layers=scan_layers)
    model = _random_model(config)
    hf.export(model, config, tmp_path)
    loaded, loaded_config = hf.load(tmp_path, scan_layers=scan_layers)
    assert loaded_config == config
    ours, theirs = _flat(model), _flat(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_transformers_loads_the_gpt2_export_with_same_logits(tmp_path):
    config = DecoderLMConfig(**SMALL, activation="gelu", tie_word_embeddings=False)
    model = _random_model(config, seed=1, std=0.1)
    hf.export(model, config, tmp_path)
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch_model.config.activation_function == "gelu"
    ids = _ids((2, 19), seed=2)
    np.testing.assert_allclose(_jit(model)(ids), _torch_logits(torch_model, ids), atol=1e-4,
                               rtol=0)


def test_gpt2model_weights_without_prefix_load(gpt2_folder, tmp_path):
    """GPT2Model checkpoints (the hub's ``gpt2``) have no ``transformer.`` prefix, no head."""
    torch_model, _ = gpt2_folder
    torch_model.transformer.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = hf.load(tmp_path, scan_layers=False)
    ids = _ids((2, 11), seed=3)
    np.testing.assert_allclose(_jit(model)(ids), _torch_logits(torch_model, ids), atol=1e-4,
                               rtol=0)


def test_gpt2_import_and_export_refuse_what_gpt2_cannot_hold(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    base = hf_gpt2.config_to_hf(DecoderLMConfig(**SMALL))
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        hf_gpt2.config_from_hf({**base, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(UserError, match="activation_function"):
        hf_gpt2.config_from_hf({**base, "activation_function": "quick_gelu"})
    rotary = DecoderLMConfig(**SMALL, position_embedding="rotary")
    with pytest.raises(UserError, match="position_embedding"):
        hf.export(_random_model(rotary), rotary, tmp_path)
    with pytest.raises(UserError, match="shape"):
        hf_gpt2.params_from_hf(hf.hf_common.read_weights(folder),
                               hf_gpt2.config_from_hf({**base, "n_inner": 2 * FF}))


# --------------------------------------------------------------------------- rotary, norms


def test_rotary_matches_a_hand_written_rotation():
    """Dims i and i + H/2 rotate by angle p * 10000**(-2i/H); dot products of rotated queries
    and keys then depend only on the distance between positions."""
    rng = np.random.default_rng(0)
    head = 8
    x = rng.normal(size=(1, 6, 2, head)).astype(np.float32)
    positions = np.array([[0, 1, 2, 5, 9, 30]])
    cos, sin = decoder_lm.rotary_angles(jnp.asarray(positions), head, 10000.0)
    ours = np.asarray(decoder_lm.apply_rotary(jnp.asarray(x), cos, sin))
    ref = np.empty_like(x)
    for t, p in enumerate(positions[0]):
        for i in range(head // 2):
            angle = p * 10000.0 ** (-2 * i / head)
            a, b = x[0, t, :, i], x[0, t, :, i + head // 2]
            ref[0, t, :, i] = a * np.cos(angle) - b * np.sin(angle)
            ref[0, t, :, i + head // 2] = a * np.sin(angle) + b * np.cos(angle)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    q, k = rng.normal(size=(2, 1, 1, 1, head)).astype(np.float32)

    def score(pq, pk):
        rq = decoder_lm.apply_rotary(q, *decoder_lm.rotary_angles(jnp.array([[pq]]), head, 1e4))
        rk = decoder_lm.apply_rotary(k, *decoder_lm.rotary_angles(jnp.array([[pk]]), head, 1e4))
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-3


def test_rotary_variant_matches_gpt_neox():
    """GPT-NeoX with full rotation and sequential residuals = pre-LN, RoPE, biases, exact GELU,
    untied head: our rotary config, its fused per-head qkv mapped by hand."""
    torch.manual_seed(1)
    neox = _perturb(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FF, max_position_embeddings=MAX_LEN, rotary_pct=1.0,
        use_parallel_residual=False, hidden_act="gelu", tie_word_embeddings=False)), 1)
    config = DecoderLMConfig(**SMALL, position_embedding="rotary", activation="gelu",
                             tie_word_embeddings=False, scan_layers=False)
    sd = {k: v.numpy() for k, v in neox.state_dict().items()}
    h = D // HEADS

    def layer(i):
        p = f"gpt_neox.layers.{i}."
        qkv_w = sd[p + "attention.query_key_value.weight"].reshape(HEADS, 3, h, D)
        qkv_b = sd[p + "attention.query_key_value.bias"].reshape(HEADS, 3, h)
        attention = {name: qkv_w[:, j].transpose(2, 0, 1) for j, name in
                     enumerate(("query", "key", "value"))}
        attention.update({f"{name}_bias": qkv_b[:, j] for j, name in
                          enumerate(("query", "key", "value"))})
        attention["out"] = sd[p + "attention.dense.weight"].T.reshape(HEADS, h, D)
        attention["out_bias"] = sd[p + "attention.dense.bias"]
        return {
            "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"],
                                   "bias": sd[p + "input_layernorm.bias"]},
            "attention": attention,
            "pre_mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"],
                             "bias": sd[p + "post_attention_layernorm.bias"]},
            "mlp": {"wi": sd[p + "mlp.dense_h_to_4h.weight"].T,
                    "wi_bias": sd[p + "mlp.dense_h_to_4h.bias"],
                    "wo": sd[p + "mlp.dense_4h_to_h.weight"].T,
                    "wo_bias": sd[p + "mlp.dense_4h_to_h.bias"]},
        }

    params = {"token_embedding": sd["gpt_neox.embed_in.weight"],
              "layers": {i: layer(i) for i in range(LAYERS)},
              "final_norm": {"scale": sd["gpt_neox.final_layer_norm.weight"],
                             "bias": sd["gpt_neox.final_layer_norm.bias"]},
              "lm_head": sd["embed_out.weight"].T}
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))),
                      jax.tree.map(jnp.asarray, params))
    ids = _ids((2, 23), seed=4)
    np.testing.assert_allclose(_jit(model)(ids), _torch_logits(neox, ids), atol=1e-4, rtol=0)


def test_rmsnorm_swiglu_rotary_variant_matches_llama():
    torch.manual_seed(2)
    llama = _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, intermediate_size=FF, max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-6, tie_word_embeddings=False)), 2)
    config = DecoderLMConfig(**SMALL, position_embedding="rotary", norm="rmsnorm",
                             layer_norm_epsilon=1e-6, activation="silu", gated_mlp=True,
                             use_bias=False, tie_word_embeddings=False, scan_layers=False)
    sd = {k: v.numpy() for k, v in llama.state_dict().items()}

    def layer(i):
        p = f"model.layers.{i}."
        return {
            "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "attention": {
                **{ours: sd[f"{p}self_attn.{t}_proj.weight"].T.reshape(D, HEADS, D // HEADS)
                   for ours, t in (("query", "q"), ("key", "k"), ("value", "v"))},
                "out": sd[p + "self_attn.o_proj.weight"].T.reshape(HEADS, D // HEADS, D)},
            "pre_mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "mlp": {"wi_0": sd[p + "mlp.gate_proj.weight"].T,
                    "wi_1": sd[p + "mlp.up_proj.weight"].T,
                    "wo": sd[p + "mlp.down_proj.weight"].T},
        }

    params = {"token_embedding": sd["model.embed_tokens.weight"],
              "layers": {i: layer(i) for i in range(LAYERS)},
              "final_norm": {"scale": sd["model.norm.weight"]},
              "lm_head": sd["lm_head.weight"].T}
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))),
                      jax.tree.map(jnp.asarray, params))
    ids = _ids((2, 19), seed=5)
    np.testing.assert_allclose(_jit(model)(ids), _torch_logits(llama, ids), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- packing, masks


@pytest.mark.parametrize("position_embedding", ["learned", "rotary"])
def test_packed_documents_equal_documents_run_separately(position_embedding):
    """The reference runs each document in its own row, right-padded: under a causal mask
    what follows a token cannot change it, so no segment logic is involved."""
    model = _random_model(DecoderLMConfig(**SMALL, position_embedding=position_embedding), 3)
    run = _jit(model)
    lengths = (5, 7, 4)
    alone_ids = _ids((3, max(lengths)), seed=10)
    packed = np.concatenate([alone_ids[i, :n] for i, n in enumerate(lengths)] + [[0, 0]])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [[0, 0]])[None]
    logits = run(packed, segment_ids=segments)
    alone = run(alone_ids)
    starts = np.cumsum((0, *lengths))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[0, starts[i]:starts[i] + n], alone[i, :n], atol=1e-5,
                                   rtol=0)
    # As one document, the second would see the first: a real difference.
    one_doc = run(packed, segment_ids=np.ones_like(segments))
    assert np.abs(one_doc[0, 5:12] - logits[0, 5:12]).max() > 1e-2


def test_custom_attention_mask_gives_a_prefix_lm():
    """A prefix-LM mask ([B, L, L], True = may attend): the prefix sees itself bidirectionally
    (= the prefix alone under an all-True mask); the causal mask passed explicitly = default."""
    model = _random_model(DecoderLMConfig(**SMALL, position_embedding="rotary"), 4)
    run = _jit(model)
    length, prefix = 12, 4
    ids = _ids((2, length), seed=6)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    prefix_lm = np.broadcast_to((j < prefix) | (j <= i), (2, length, length))
    causal = np.broadcast_to(j <= i, (2, length, length))
    np.testing.assert_allclose(run(ids, attention_mask=causal), run(ids), atol=1e-6, rtol=0)
    out = run(ids, attention_mask=prefix_lm)
    alone = run(ids[:, :prefix], attention_mask=np.ones((2, prefix, prefix), bool))
    np.testing.assert_allclose(out[:, :prefix], alone, atol=1e-5, rtol=0)
    assert np.abs(out[:, :prefix] - run(ids)[:, :prefix]).max() > 1e-2
    with pytest.raises(UserError, match="attention_mask"):
        model(ids, attention_mask=np.ones((2, length, length - 1), bool))


def test_extend_with_a_mask_then_causally_equals_the_prefix_lm_forward():
    """``extend`` (UniLM's decoding step): a prefix written at slot 0 under a mask that lets it
    see itself bidirectionally, then the rest written causally behind it in the cache, gives
    the prefix-LM forward's logits; a mask of the wrong shape is one sentence."""
    model = _random_model(DecoderLMConfig(**SMALL, position_embedding="rotary"), 5)
    length, prefix, slots = 12, 4, 15  # spare slots: never valid, never attended
    ids = _ids((2, length), seed=7)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    prefix_lm = np.broadcast_to((j < prefix) | (j <= i), (2, length, length))
    positions = np.broadcast_to(np.arange(length), (2, length))
    sees_prefix = np.broadcast_to(np.arange(slots) < prefix, (2, prefix, slots))

    def two_writes(m):
        def run(ids, positions, sees_prefix):
            cache = m.init_cache(2, slots)
            first, cache = m.extend(ids[:, :prefix], cache, 0, valid=np.ones((2, prefix), bool),
                                    positions=positions[:, :prefix], attention_mask=sees_prefix)
            rest, cache = m.extend(ids[:, prefix:], cache, prefix,
                                   valid=np.ones((2, length - prefix), bool),
                                   positions=positions[:, prefix:])
            return m.logits(jnp.concatenate([first, rest], axis=1)), cache["valid"]
        return run

    logits, valid = _jit(model, two_writes)(ids, positions, sees_prefix)
    np.testing.assert_allclose(logits, _jit(model)(ids, attention_mask=prefix_lm), atol=1e-5,
                               rtol=0)
    assert valid[:, :length].all() and not valid[:, length:].any()
    causal = _jit(model)(ids)
    assert np.abs(logits[:, :prefix] - causal[:, :prefix]).max() > 1e-2  # the mask mattered
    with pytest.raises(UserError, match="attention_mask"):
        model.extend(ids, model.init_cache(2, slots), 0, valid=np.ones((2, length), bool),
                     positions=positions, attention_mask=np.ones((2, length, length), bool))


# --------------------------------------------------------------------------- config, specs


def test_config_refuses_unknown_keys_and_bad_values():
    assert DecoderLMConfig.from_dict({"d_model": 64}).d_model == 64
    with pytest.raises(UserError, match="d_modle"):
        DecoderLMConfig.from_dict({"d_modle": 64})
    for field, value in (("position_embedding", "alibi"), ("norm", "batchnorm"),
                         ("activation", "tanh"), ("remat_policy", "some"),
                         ("dtype", "float16"), ("num_layers", 0), ("dropout_rate", 1.5)):
        with pytest.raises(UserError, match=field):
            DecoderLMConfig(**{field: value})
    with pytest.raises(UserError, match="even"):
        DecoderLMConfig(d_kv=7, position_embedding="rotary")
    model = _random_model(DecoderLMConfig(**SMALL))
    with pytest.raises(UserError, match="max_length"):
        model(np.zeros((1, MAX_LEN + 1), int))


@pytest.mark.parametrize("variant", [
    dict(scan_layers=True), dict(scan_layers=False),
    dict(scan_layers=True, position_embedding="rotary", norm="rmsnorm", gated_mlp=True,
         use_bias=False, tie_word_embeddings=False)])
def test_every_param_has_logical_axis_names(variant):
    config = DecoderLMConfig(**{**SMALL, **variant})
    state = nnx.state(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))), nnx.Param)
    specs = {".".join(map(str, p)): tuple(s.get_value())
             for p, s in nnx.to_flat_state(nnx.get_partition_spec(state))}
    known = {"vocab", "embed", "heads", "kv", "mlp", "layers", decoder_lm.POSITION_AXIS}
    params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    assert specs.keys() == params.keys() and len(params) >= 7
    for key, param in params.items():
        spec = specs[key]
        assert len(spec) == param.ndim and set(spec) <= known, (key, spec)
        assert (spec[0] == "layers") == (config.scan_layers and key.startswith("layers.")), key
    stacked = "layers." if config.scan_layers else "layers.0."
    prefix = ("layers",) if config.scan_layers else ()
    assert specs["token_embedding"] == ("vocab", "embed")
    assert specs[stacked + "attention.query"] == (*prefix, "embed", "heads", "kv")
    assert specs[stacked + "attention.out"] == (*prefix, "heads", "kv", "embed")
    if config.use_bias:
        assert specs["position_embedding"] == (decoder_lm.POSITION_AXIS, "embed")
        assert specs[stacked + "attention.query_bias"] == (*prefix, "heads", "kv")
        assert specs[stacked + "mlp.wi_bias"] == (*prefix, "mlp")
    else:
        assert specs[stacked + "mlp.wi_0"] == (*prefix, "embed", "mlp")
        assert specs["lm_head"] == ("embed", "vocab")


def test_init_follows_gpt2():
    config = DecoderLMConfig(**{**SMALL, "d_model": 64, "d_kv": 16, "d_ff": 256})
    model = nnx.jit(lambda: DecoderLM(config, rngs=nnx.Rngs(params=0)))()  # one compile
    assert np.std(model.token_embedding[...]) == pytest.approx(0.02, rel=0.05)
    assert np.std(model.layers.attention.query[...]) == pytest.approx(0.02, rel=0.1)
    assert np.std(model.layers.mlp.wo[...]) == pytest.approx(0.02 / (2 * LAYERS) ** 0.5, rel=0.1)
    assert np.all(model.layers.attention.out_bias[...] == 0)
    assert np.all(model.final_norm.scale[...] == 1)


def test_dropout_key_comes_from_the_call_and_is_off_by_default():
    config = DecoderLMConfig(**SMALL, dropout_rate=0.3, attention_dropout_rate=0.2)
    model = _random_model(config, 5)
    ids = _ids((2, 9), seed=7)
    on, off = (_jit(model, lambda m, e=e: lambda key: m(ids, enable_dropout=e,
                                                       rngs=nnx.Rngs(dropout=key)))
               for e in (True, False))
    k0, k1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(off(k0), off(k1))
    np.testing.assert_array_equal(on(k0), on(k0))
    assert np.abs(on(k0) - off(k0)).max() > 1e-2
    assert np.abs(on(k0) - on(k1)).max() > 1e-2

