"""MobileBERT against transformers (the oracle) and through the real training loop.

Parity (float32, 1e-4) of ``MobileBertForPreTraining`` logits built from small random configs
(NoNorm with the shared key/query bottleneck and 3 stacked FFNs; LayerNorm without a bottleneck;
an inverted bottleneck, the teacher's shape), on a padded batch; import/export through
``interop.hf``; then ``configs/mobilebert.py:tiny`` for 20 steps through ``t5x-like train``
(loss falls, bit-exact resume) and ``t5x-like eval``, and on 8 fake devices.
"""

import os

os.environ.setdefault("USE_TF", "0")

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import t5x_like  # noqa: F401  (modules carry logical names only)
from t5x_like.errors import UserError
from t5x_like.interop import hf, hf_mobilebert
from t5x_like.models.mobilebert import MobileBertConfig, MobileBertModel

VOCAB, LENGTH = 50, 10
BASE = dict(vocab_size=VOCAB, embedding_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=24, intra_bottleneck_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_feedforward_networks=3)
CASES = {
    "no_norm_bottleneck": BASE,
    # LayerNorm (two sites use torch's eps 1e-5), no bottleneck, one FFN, no trigram.
    "layer_norm_plain": {**BASE, "normalization_type": "layer_norm", "use_bottleneck": False,
                         "num_feedforward_networks": 1, "trigram_input": False,
                         "hidden_act": "gelu", "classifier_activation": False},
    # The IB-BERT teacher's shape: the bottleneck wider than the inter-block width, q/k/v all
    # from it.
    "inverted_bottleneck": {**BASE, "intra_bottleneck_size": 64, "use_bottleneck_attention": True,
                            "key_query_shared_bottleneck": False},
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-scale weights (HF's 0.02 init makes every logit ~0 and hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "LayerNorm.weight" in name else 0.3 * noise)
    return model.eval()


def _batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, (3, LENGTH))
    mask = np.ones((3, LENGTH), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


class _Saved(dict):
    """case -> (torch model, its save_pretrained folder), built on first use."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, name):
        model = _randomize(transformers.MobileBertForPreTraining(
            transformers.MobileBertConfig(**CASES[name])), seed=list(CASES).index(name))
        folder = self.factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        self[name] = (model, folder)
        return self[name]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _Saved(tmp_path_factory)


def _compare(torch_model, ours, ids, mask, types):
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          token_type_ids=torch.tensor(types), output_hidden_states=True)
    got = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types),
               output_hidden_states=True)
    real = mask.astype(bool)  # padded positions are not compared (their values are arbitrary)
    np.testing.assert_allclose(np.asarray(got["mlm_logits"])[real],
                               ref.prediction_logits.numpy()[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got["nsp_logits"]), ref.seq_relationship_logits.numpy(),
                               atol=1e-4, rtol=1e-4)
    # NoNorm does not normalise, so hidden states grow to ~1e2 with unit-scale weights: their
    # float32 rounding is relative to that scale (the logits above are held to 1e-4 as they are).
    for ours_h, ref_h in zip(np.asarray(got["hidden_states"]), ref.hidden_states, strict=True):
        ref_h = ref_h.numpy()[real]
        scale = max(1.0, float(np.abs(ref_h).max()))
        np.testing.assert_allclose(ours_h[real], ref_h, atol=1e-5 * scale, rtol=1e-4)


# The default run keeps MobileBERT's own shape (NoNorm, bottleneck, stacked FFNs), scanned.
@pytest.mark.parametrize("case,scan", [
    ("no_norm_bottleneck", True),
    *(pytest.param(c, s, marks=pytest.mark.slow) for c in CASES for s in (True, False)
      if (c, s) != ("no_norm_bottleneck", True))])
def test_logits_match_transformers_on_a_padded_batch(saved, case, scan):
    torch_model, folder = saved[case]
    model, config = hf.load(folder, scan_layers=scan)
    assert isinstance(config, MobileBertConfig) and config.mlm_head and config.nsp_head
    _compare(torch_model, model, *_batch())


def test_export_loads_in_transformers_with_the_same_logits(saved, tmp_path):
    torch_model, folder = saved["no_norm_bottleneck"]
    model, config = hf.load(folder)
    hf.export(model, config, tmp_path / "out")
    again = transformers.MobileBertForPreTraining.from_pretrained(tmp_path / "out").eval()
    _compare(again, model, *_batch())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["MobileBertForPreTraining"]
    # A bare encoder (MobileBertModel) imports too: no heads.
    bare = tmp_path / "bare"
    torch_model.mobilebert.save_pretrained(bare, safe_serialization=True)
    model, config = hf.load(bare)
    assert not config.mlm_head and not config.nsp_head
    ids, mask, types = _batch()
    with torch.no_grad():
        ref = torch_model.mobilebert(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask),
                                     token_type_ids=torch.tensor(types))
    got = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(got["pooled_output"]), ref.pooler_output.numpy(),
                               atol=1e-4, rtol=1e-4)


def _count(config: MobileBertConfig) -> int:
    abstract = nnx.eval_shape(lambda: MobileBertModel(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))


def test_parameter_counts_equal_transformers():
    """MobileBERT as published (24 layers, 512 / 128, 4 FFNs): the encoder has 24.8M parameters
    (the paper's table says 25.3M), the pretraining heads add the (H - E) x V decoder rows."""
    config = transformers.MobileBertConfig()
    with torch.device("meta"):
        full = transformers.MobileBertForPreTraining(config)
        bare = transformers.MobileBertModel(config)
    # transformers counts the tied decoder once (it is the word table); ours holds no copy.
    assert _count(MobileBertConfig()) == sum(p.numel() for p in full.parameters())
    encoder = _count(MobileBertConfig(mlm_head=False, nsp_head=False))
    assert encoder == sum(p.numel() for p in bare.parameters()) == 24_844_544


def test_bad_configs_are_one_sentence():
    with pytest.raises(UserError, match="not divisible by num_heads"):
        MobileBertConfig(intra_bottleneck_size=30, num_heads=4)
    with pytest.raises(UserError, match="normalization_type"):
        MobileBertConfig(normalization_type="batch_norm")
    with pytest.raises(UserError, match="E <= H"):
        MobileBertConfig(embedding_size=64, hidden_size=32, intra_bottleneck_size=16)
    with pytest.raises(UserError, match="unknown mobilebert config key"):
        MobileBertConfig.from_dict({"hidden": 3})
    with pytest.raises(UserError, match="cannot override"):
        hf_mobilebert.config_from_hf({"model_type": "mobilebert"}, mlm=True, nsp=True,
                                     hidden_size=8)
