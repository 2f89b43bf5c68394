"""The encoder family against transformers (the oracle): BERT, RoBERTa, ALBERT, ELECTRA.

Parity (float32, 1e-4) with transformers models built from small random configs, including
padded rows; import/export round trips; ALBERT-base parameter counts against the paper and
transformers; logical axis names; sharing, SBO, ELECTRA pair. Real MiniLM weights are tested in
test_hf_vocab.py (they are tokenised with the vocabulary adapter, which imports TensorFlow).
"""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf, hf_encoder
from t5x_like.models.encoder import ElectraPair, EncoderConfig, EncoderModel, generator_config

VOCAB, LENGTH = 60, 12
BASE = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32, max_position_embeddings=24, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)

# name -> (transformers class, its config, {our output: HF output}).
CASES = {
    "bert": (transformers.BertForPreTraining, transformers.BertConfig(**BASE),
             {"mlm_logits": "prediction_logits", "nsp_logits": "seq_relationship_logits"}),
    "roberta": (transformers.RobertaForMaskedLM,
                transformers.RobertaConfig(**{**BASE, "max_position_embeddings": LENGTH + 2}),
                {"mlm_logits": "logits"}),
    # E != H, 4 layers in 2 groups of 2 (num_hidden_groups > 1), tanh GELU (ALBERT's default).
    "albert_groups": (transformers.AlbertForPreTraining,
                      transformers.AlbertConfig(**{**BASE, "num_hidden_layers": 4},
                                                embedding_size=8, num_hidden_groups=2),
                      {"mlm_logits": "prediction_logits", "nsp_logits": "sop_logits"}),
    "albert_shared": (transformers.AlbertForPreTraining,
                      transformers.AlbertConfig(**BASE, embedding_size=8, num_hidden_groups=1),
                      {"mlm_logits": "prediction_logits", "nsp_logits": "sop_logits"}),
    "electra_discriminator": (transformers.ElectraForPreTraining,
                              transformers.ElectraConfig(**BASE, embedding_size=8),
                              {"discriminator_logits": "logits"}),
    "electra_generator": (transformers.ElectraForMaskedLM,
                          transformers.ElectraConfig(**BASE, embedding_size=8),
                          {"mlm_logits": "logits"}),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of unit-scale outputs (HF's 0.02 init makes every logit ~0, hiding bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = ("LayerNorm" in name or "layer_norm" in name) and "weight" in name
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.3 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, folder with its save_pretrained safetensors), built on demand."""
    cache = {}

    def get(name):
        if name not in cache:
            cls, config, _ = CASES[name]
            model = _randomize(cls(config), seed=len(cache))
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder, safe_serialization=True)
            cache[name] = model, folder
        return cache[name]

    return get


def _batch(pad_id: int, seed: int = 0):
    """Three rows: full, padded after 8, padded after 3; two segments."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (3, LENGTH))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids = np.where(mask == 1, ids, pad_id)
    types = np.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


def _torch_outputs(model, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types), output_hidden_states=True)
    return {k: (np.stack([h.numpy() for h in v]) if k == "hidden_states" else v.numpy())
            for k, v in out.items() if v is not None}


def _jit_call(model, **kwargs):
    """The integrator's pattern: split once, merge inside jax.jit."""
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a, output_hidden_states=True, **kwargs))
    return lambda *a: jax.tree.map(np.asarray, fn(params, *a))


# Every case stacked (scan); the list layout for plain and grouped layers (compiles are slow).
@pytest.mark.parametrize("name,scan_layers", [*((name, True) for name in CASES),
                                              ("bert", False), ("albert_groups", False)])
def test_outputs_match_transformers(saved, name, scan_layers):
    torch_model, folder = saved(name)
    model, config = hf.load(folder, scan_layers=scan_layers)
    hf_config = CASES[name][1]
    ids, mask, types = _batch(hf_config.pad_token_id)
    if name == "roberta":
        types = np.zeros_like(types)  # RoBERTa has one token type
    ref = _torch_outputs(torch_model, ids, mask, types)
    ours = _jit_call(model)(ids, mask, types)
    # RoBERTa gives padding tokens position padding_idx, so only real tokens can agree; the
    # other models compute the same numbers at padded positions too.
    rows = mask.astype(bool) if name == "roberta" else np.ones_like(mask, bool)
    assert ours["last_hidden_state"].shape == (3, LENGTH, hf_config.hidden_size)
    np.testing.assert_allclose(ours["last_hidden_state"][rows],
                               ref["hidden_states"][-1][rows], atol=1e-4, rtol=0)
    assert ours["hidden_states"].shape[0] == hf_config.num_hidden_layers + 1
    np.testing.assert_allclose(ours["hidden_states"][:, rows], ref["hidden_states"][:, rows],
                               atol=1e-4, rtol=0)
    for ours_key, ref_key in CASES[name][2].items():
        assert ours[ours_key].dtype == np.float32
        assert np.abs(ref[ref_key]).max() > 0.3  # large enough that 1e-4 means something
        a, b = ours[ours_key], ref[ref_key]
        if ours_key != "nsp_logits":
            a, b = a[rows], b[rows]
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=ours_key)
    if name == "bert" and scan_layers:
        # BERT's trick: project only the selected positions onto the vocabulary.
        positions = np.array([[0, 5, 7], [1, 2, 7], [0, 1, 2]])
        picked = _jit_call(model, masked_positions=positions)(ids, mask, types)["mlm_logits"]
        assert picked.shape == (3, 3, VOCAB)
        np.testing.assert_allclose(
            picked, np.take_along_axis(ours["mlm_logits"], positions[..., None], 1), atol=1e-5)


def test_import_picks_heads_sharing_and_sizes(saved):
    _, config = hf.load(saved("albert_groups")[1])
    assert (config.model_type, config.layer_sharing, config.num_layer_groups) == (
        "albert", "groups", 2)
    assert (config.embedding_size, config.hidden_act) == (8, "gelu_new")
    assert config.pooler and config.mlm_head and config.nsp_head
    assert hf.load(saved("albert_shared")[1])[1].layer_sharing == "all"
    _, config = hf.load(saved("roberta")[1])
    assert config.position_offset == 2 and not config.pooler and not config.nsp_head
    _, config = hf.load(saved("electra_discriminator")[1])
    assert config.discriminator_head and not config.mlm_head and not config.pooler


def test_bert_model_without_prefix_and_masked_lm_with_prefix(tmp_path):
    """A bare BertModel save has no ``bert.`` prefix; BertForMaskedLM has one and no pooler."""
    config = transformers.BertConfig(**BASE)
    ids, mask, types = _batch(0)
    for cls, heads in ((transformers.BertModel, {"pooler"}),
                       (transformers.BertForMaskedLM, {"mlm"})):
        torch_model = _randomize(cls(config), seed=3)
        folder = tmp_path / cls.__name__
        torch_model.save_pretrained(folder, safe_serialization=True)
        names = safetensors.numpy.load_file(folder / "model.safetensors")
        assert any(n.startswith("bert.") for n in names) == (cls is not transformers.BertModel)
        model, ours_config = hf.load(folder)
        assert {h for h, on in [("pooler", ours_config.pooler), ("mlm", ours_config.mlm_head),
                                ("nsp", ours_config.nsp_head)] if on} == heads
        ref = _torch_outputs(torch_model, ids, mask, types)
        out = _jit_call(model)(ids, mask, types)
        np.testing.assert_allclose(out["last_hidden_state"], ref["hidden_states"][-1], atol=1e-4)
        if cls is transformers.BertModel:
            np.testing.assert_allclose(out["pooled_output"], ref["pooler_output"], atol=1e-4)


# --------------------------------------------------------------------------- round trips


def _random_model(config: EncoderConfig, seed: int = 0, cls=EncoderModel):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


def _flat(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


SMALL = dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             max_position_embeddings=24, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
ROUND_TRIPS = {
    "BertForPreTraining": dict(model_type="bert"),
    "BertModel": dict(model_type="bert", mlm_head=False, nsp_head=False),
    "RobertaForMaskedLM": dict(model_type="roberta", position_offset=2, pooler=False,
                               nsp_head=False, max_position_embeddings=LENGTH + 2),
    "AlbertForPreTraining": dict(model_type="albert", embedding_size=8, layer_sharing="groups",
                                 num_layers=4, num_layer_groups=2, hidden_act="gelu_new"),
    "ElectraForPreTraining": dict(model_type="electra", embedding_size=8, pooler=False,
                                  nsp_head=False, mlm_head=False, discriminator_head=True),
    "ElectraForMaskedLM": dict(model_type="electra", pooler=False, nsp_head=False),
}


@pytest.mark.parametrize("architecture", list(ROUND_TRIPS))
def test_export_round_trip_is_exact_and_transformers_agrees(tmp_path, architecture):
    scan = architecture != "BertModel"  # one unscanned layout too
    config = EncoderConfig(**{**SMALL, **ROUND_TRIPS[architecture]}, scan_layers=scan)
    model = _random_model(config, seed=1)
    hf.export(model, config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    loaded, loaded_config = hf.load(tmp_path, scan_layers=scan)
    assert loaded_config == config
    ours, theirs = _flat(model), _flat(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

    torch_model, info = getattr(transformers, architecture).from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask, types = _batch(config.position_offset - 1 if config.position_offset else 0, seed=2)
    if config.model_type == "roberta":
        types = np.zeros_like(types)
    ref = _torch_outputs(torch_model.eval(), ids, mask, types)
    out = _jit_call(model)(ids, mask, types)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out["last_hidden_state"][valid], ref["hidden_states"][-1][valid],
                               atol=1e-4, rtol=0)
    for ours_key, ref_key in (("mlm_logits", "prediction_logits"), ("mlm_logits", "logits"),
                              ("discriminator_logits", "logits")):
        if ours_key in out and ref_key in ref:
            np.testing.assert_allclose(out[ours_key][valid], ref[ref_key][valid], atol=1e-4,
                                       rtol=0)


def test_electra_pair_shares_embeddings_and_exports_both_halves(tmp_path):
    config = EncoderConfig(**SMALL, **ROUND_TRIPS["ElectraForPreTraining"],
                           generator_fraction=0.25)
    pair = _random_model(config, seed=4, cls=ElectraPair)
    gen = generator_config(config)
    assert (gen.hidden_size, gen.num_heads, gen.intermediate_size, gen.num_layers) == (4, 1, 8, 2)
    assert pair.generator.embeddings is pair.discriminator.embeddings
    flat = _flat(pair)
    assert not any(k.startswith("generator.embeddings") for k in flat)  # stored once
    assert "generator.encoder.embedding_projection.kernel" in flat  # E=8 -> generator H=4
    ids, mask, types = _batch(0, seed=5)

    graphdef, params = nnx.split(pair, nnx.Param)

    def generator_loss(p):
        return jnp.sum(nnx.merge(graphdef, p).generator(ids, mask, types)["mlm_logits"] ** 2)

    grads = jax.jit(jax.grad(generator_loss))(params)
    assert float(jnp.abs(grads["discriminator"]["embeddings"]["word_embeddings"]).max()) > 0

    hf.export(pair, config, tmp_path)
    for half, cls, key in (("discriminator", transformers.ElectraForPreTraining,
                            "discriminator_logits"),
                           ("generator", transformers.ElectraForMaskedLM, "mlm_logits")):
        torch_model = cls.from_pretrained(tmp_path / half).eval()
        ref = _torch_outputs(torch_model, ids, mask, types)
        out = _jit_call(getattr(pair, half))(ids, mask, types)
        np.testing.assert_allclose(out[key], ref["logits"], atol=1e-4, rtol=0, err_msg=half)
    loaded_gen, _ = hf.load(tmp_path / "generator")
    np.testing.assert_array_equal(loaded_gen.embeddings.word_embeddings[...],
                                  flat["discriminator.embeddings.word_embeddings"])


# --------------------------------------------------------------------------- sizes and names

ALBERT_BASE = dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_layers=12,
                   num_heads=12, intermediate_size=3072, model_type="albert",
                   hidden_act="gelu_new")


def _count(config: EncoderConfig) -> int:
    state = nnx.state(nnx.eval_shape(lambda: EncoderModel(config, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("sharing,groups,published", [("all", 1, 12e6), ("none", 12, 89e6)])
def test_albert_base_parameter_counts(sharing, groups, published):
    """ALBERT paper, Table 3 (E = 128): all-shared 12M, not-shared 89M. Ours equals
    transformers' AlbertForPreTraining (embeddings, layers, pooler, MLM and SOP heads).

    The paper rounds to the million, so "12M" is [11.5M, 12.5M): transformers' own count for
    the same model is 11.81M (1.6% under 12M), which no counting convention brings within 1%
    (no pooler: 11.09M). The not-shared count is within 1% of 89M.
    """
    config = EncoderConfig(**ALBERT_BASE, layer_sharing=sharing)
    with torch.device("meta"):
        reference = transformers.AlbertForPreTraining(transformers.AlbertConfig(
            vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
            num_attention_heads=12, intermediate_size=3072, num_hidden_groups=groups))
    theirs = sum(p.numel() for p in reference.parameters())
    ours = _count(config)
    assert ours == theirs
    if sharing == "none":
        assert abs(ours - published) / published < 0.01
    else:
        assert abs(ours - published) < 0.5e6


def test_sharing_modes_count_what_they_share():
    """attention/ffn sharing keep one copy of that sub-layer and N of the other."""
    base = EncoderConfig(**SMALL)
    none, attn, ffn, all_ = (_count(EncoderConfig(**SMALL, layer_sharing=s))
                             for s in ("none", "attention", "ffn", "all"))
    h, i, n = base.hidden_size, base.intermediate_size, base.num_layers
    attention = 4 * (h * h + h) + 2 * h
    feed_forward = h * i + i + i * h + h + 2 * h
    assert none - attn == (n - 1) * attention
    assert none - ffn == (n - 1) * feed_forward
    assert none - all_ == (n - 1) * (attention + feed_forward)
    four = EncoderConfig(**{**SMALL, "num_layers": 4})
    assert _count(dataclasses.replace(four, layer_sharing="groups", num_layer_groups=2)) == (
        _count(four) - 2 * (attention + feed_forward))


def test_attention_sharing_equals_unshared_layers_with_copied_attention():
    """A model that shares attention computes what an unshared model with N equal
    attention copies computes (each layer keeps its own FFN)."""
    ids, mask, types = _batch(0, seed=6)
    shared = _random_model(EncoderConfig(**SMALL, layer_sharing="attention"), seed=7)
    params = nnx.to_pure_dict(nnx.state(shared, nnx.Param))
    n = SMALL["num_layers"]
    params["encoder"]["layers"]["attention"] = jax.tree.map(
        lambda a: np.broadcast_to(a, (n, *a.shape)), params["encoder"].pop("shared")["attention"])
    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: EncoderModel(EncoderConfig(**SMALL), rngs=nnx.Rngs(0))))
    plain = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    a = _jit_call(shared)(ids, mask, types)
    b = _jit_call(plain)(ids, mask, types)
    np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"], atol=1e-5)
    np.testing.assert_allclose(a["mlm_logits"], b["mlm_logits"], atol=1e-4)


LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv", "layers", "position", "type", "classes",
                 "span_parts"}


@pytest.mark.parametrize("overrides", [
    dict(scan_layers=True),
    dict(scan_layers=False, layer_sharing="ffn", sbo_head=True),
    dict(scan_layers=True, layer_sharing="groups", num_layer_groups=2, embedding_size=8),
    dict(scan_layers=True, pair=True, **ROUND_TRIPS["ElectraForPreTraining"]),
])
def test_every_param_has_logical_axis_names(overrides):
    overrides = dict(overrides)
    cls = ElectraPair if overrides.pop("pair", False) else EncoderModel
    config = EncoderConfig(**{**SMALL, **overrides})
    state = nnx.state(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))), nnx.Param)
    specs = {".".join(map(str, p)): tuple(s.get_value())
             for p, s in nnx.to_flat_state(nnx.get_partition_spec(state))}
    checked = 0
    for path, param in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        assert len(specs[key]) == param.ndim and set(specs[key]) <= LOGICAL_NAMES, (key, specs)
        stacked = config.scan_layers and ".layers." in f".{key}"
        assert (specs[key][:1] == ("layers",)) == stacked, key
        checked += 1
    assert checked == len(jax.tree.leaves(state)) > 20
    if cls is ElectraPair:
        assert specs["discriminator.discriminator.prediction.kernel"] == ("mlp",)
        assert specs["generator.mlm.transform.kernel"] == ("mlp", "embed")
        specs = {k.removeprefix("discriminator."): v for k, v in specs.items()}
    assert specs["embeddings.word_embeddings"] == ("vocab", "embed")
    assert specs["embeddings.position_embeddings"] == ("position", "embed")
    assert specs["embeddings.token_type_embeddings"] == ("type", "embed")
    assert specs.get("mlm.bias", ("vocab",)) == ("vocab",)
    if config.scan_layers:
        assert specs["encoder.layers.attention.query.kernel"] == ("layers", "embed", "heads", "kv")
        assert specs["encoder.layers.attention.out.kernel"] == ("layers", "heads", "kv", "embed")
        assert specs["encoder.layers.ffn.wi.kernel"] == ("layers", "embed", "mlp")
    else:
        assert specs["encoder.shared.ffn.wo.kernel"] == ("mlp", "embed")


# --------------------------------------------------------------------------- other behaviour


def test_span_boundary_head_follows_spanbert():
    """SBO logits recomputed in numpy from the parameters: [x_{s-1}; x_{e+1}; p_i] through
    dense-GELU-LN twice, then the tied decoder + bias."""
    config = EncoderConfig(**SMALL, sbo_head=True, scan_layers=False)
    model = _random_model(config, seed=9)
    ids, mask, types = _batch(0, seed=10)
    spans = np.array([[[1, 5, 0], [1, 5, 1], [1, 5, 2]], [[3, 7, 0], [0, 2, 0], [0, 2, 0]],
                      [[0, 2, 0], [0, 2, 0], [0, 2, 0]]])
    out = _jit_call(model, span_boundaries=spans)(ids, mask, types)
    p = _flat(model)
    hidden = out["last_hidden_state"]

    def gelu(x):
        return 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))

    def norm(x, name):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
        return x * p[f"sbo.{name}.scale"] + p[f"sbo.{name}.bias"]

    b = np.arange(3)[:, None]
    x = np.concatenate([hidden[b, spans[..., 0]], hidden[b, spans[..., 1]],
                        p["sbo.position_embeddings"][spans[..., 2]]], -1)
    h = norm(gelu(x @ p["sbo.dense1.kernel"].reshape(-1, 16) + p["sbo.dense1.bias"]), "norm1")
    h = norm(gelu(h @ p["sbo.dense2.kernel"] + p["sbo.dense2.bias"]), "norm2")
    expected = h @ p["embeddings.word_embeddings"].T + p["sbo.bias"]
    np.testing.assert_allclose(out["sbo_logits"], expected, atol=1e-4, rtol=1e-5)


def test_remat_and_scan_do_not_change_numbers_or_gradients():
    """All layers shared (one layer run N times: the inner loop remats each run): stacked with
    full remat and listed without give the same loss and gradients."""
    ids, mask, types = _batch(0, seed=11)
    base = EncoderConfig(**SMALL, layer_sharing="all")
    stacked = nnx.to_pure_dict(nnx.state(_random_model(base, seed=12), nnx.Param))
    results = []
    for policy, scan in (("none", False), ("full", True)):
        config = dataclasses.replace(base, remat_policy=policy, scan_layers=scan)
        params = jax.tree.map(jnp.asarray, stacked)
        if not scan:  # the same single layer, as a list of one
            params["encoder"]["layers"] = {0: jax.tree.map(lambda a: a[0],
                                                           params["encoder"]["layers"])}
        graphdef = nnx.graphdef(nnx.eval_shape(lambda c=config: EncoderModel(c, rngs=nnx.Rngs(0))))

        def loss(p, graphdef=graphdef):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(ids, mask, types)["mlm_logits"]))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        layer = grads["encoder"]["layers"]
        wo = layer["ffn"]["wo"]["kernel"] if scan else layer[0]["ffn"]["wo"]["kernel"][None]
        results.append((float(value), np.asarray(wo)))
    assert np.abs(results[0][1]).max() > 0
    for value, wo in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(wo, results[0][1], atol=1e-5, rtol=1e-4)


def test_bfloat16_compute_is_close_and_dropout_is_keyed():
    ids, mask, types = _batch(0, seed=13)
    f32 = _random_model(EncoderConfig(**SMALL), seed=14)
    bf16 = _random_model(EncoderConfig(**SMALL, dtype="bfloat16"), seed=14)
    ref, out = _jit_call(f32)(ids, mask, types), _jit_call(bf16)(ids, mask, types)
    assert out["mlm_logits"].dtype == np.float32
    # bf16 keeps ~3 significant digits: a few percent of the logit range over 4 layers.
    assert np.abs(out["mlm_logits"] - ref["mlm_logits"]).max() < 0.05 * np.abs(
        ref["mlm_logits"]).max()

    model = _random_model(EncoderConfig(**{**SMALL, "hidden_dropout_rate": 0.2,
                                           "attention_dropout_rate": 0.2}), seed=15)
    graphdef, params = nnx.split(model, nnx.Param)
    run = jax.jit(lambda p, key, enable: nnx.merge(graphdef, p)(
        ids, mask, types, enable_dropout=enable, rngs=nnx.Rngs(dropout=key))["mlm_logits"],
        static_argnums=2)
    # "rbg" keys compile several times faster than threefry on CPU (many dropout sites).
    k0, k1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(run(params, k0, False), run(params, k1, False))
    np.testing.assert_array_equal(run(params, k0, True), run(params, k0, True))
    assert np.abs(run(params, k0, True) - run(params, k1, True)).max() > 1e-2


# --------------------------------------------------------------------------- errors


def test_bad_configs_and_checkpoints_raise_user_errors(saved, tmp_path):
    with pytest.raises(UserError, match="unknown encoder config key"):
        EncoderConfig.from_dict({"hidden": 3})
    with pytest.raises(UserError, match="layer_sharing"):
        EncoderConfig(layer_sharing="some")
    with pytest.raises(UserError, match="not divisible by num_layer_groups"):
        EncoderConfig(num_layers=12, layer_sharing="groups", num_layer_groups=5)
    with pytest.raises(UserError, match="nsp_head=True needs pooler"):
        EncoderConfig(pooler=False)
    with pytest.raises(UserError, match="shares no layers"):
        config = EncoderConfig(**SMALL, layer_sharing="attention")
        hf.export(_random_model(config), config, tmp_path / "x")

    _, folder = saved("bert")
    text = (folder / "config.json").read_text()
    work = tmp_path / "bert"
    work.mkdir()
    (work / "model.safetensors").symlink_to(folder / "model.safetensors")
    for change, message in ((dict(hidden_act="relu"), "hidden_act"),
                            (dict(hidden_size="16"), "hidden_size='16'; expected a int"),
                            (dict(position_embedding_type="relative_key"),
                             "position_embedding_type"),
                            (dict(intermediate_size=40), "intermediate.dense.weight has shape"),
                            (dict(num_attention_heads=3), "not divisible by num_heads")):
        (work / "config.json").write_text(json.dumps({**json.loads(text), **change}))
        with pytest.raises(UserError, match=message):
            hf.load(work)
    (work / "config.json").write_text(text)
    with pytest.raises(UserError, match="overrides may set only"):
        hf.load(work, vocab_size=10)

    albert = json.loads((saved("albert_groups")[1] / "config.json").read_text())
    with pytest.raises(UserError, match="inner_group_num"):
        hf_encoder.config_from_hf({**albert, "inner_group_num": 2}, set())

    # A missing tensor is named (here: layer 1's FFN output) rather than failing inside JAX.
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    cut = tmp_path / "cut"
    cut.mkdir()
    safetensors.numpy.save_file(tensors, cut / "model.safetensors")
    (cut / "config.json").write_text(text)
    with pytest.raises(UserError, match="lack tensor encoder.layer.1.output.dense.weight"):
        hf.load(cut)
