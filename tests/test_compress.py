"""Compression pieces against hand computations and transformers: distillation losses (the T^2
factor included), Q8BERT fake quantization (error bound, straight-through gradients, EMA) and
int8 export, head masks and attention maps against BertModel, head importance, head removal,
the cubic sparsity schedule and DistilBERT's layer copy."""

import os

os.environ.setdefault("USE_TF", "0")

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import t5x_like  # noqa: F401  (no eager sharding)
from t5x_like.compress import artifacts
from t5x_like.compress import distill as D
from t5x_like.compress import prune as P
from t5x_like.compress import quantize as Q
from t5x_like.models.encoder import EncoderConfig, EncoderModel

SMALL = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             max_position_embeddings=16, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
             pooler=False, nsp_head=False)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _batch(seed=0, rows=3, length=12, vocab=64):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (rows, length))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with(config, params):
    return artifacts.merge(config, params)


# --------------------------------------------------------------------------- distillation


def test_soft_target_loss_is_the_hand_computed_cross_entropy_times_t_squared():
    rng = np.random.RandomState(0)
    s, t = rng.randn(2, 5, 11) * 3, rng.randn(2, 5, 11) * 3
    w = (rng.rand(2, 5) > 0.3).astype(np.float32)
    for temperature in (1.0, 2.0, 4.0):
        p_t = _np_softmax(t / temperature)
        log_p_s = np.log(_np_softmax(s / temperature))
        hand = temperature**2 * np.sum(w * -np.sum(p_t * log_p_s, -1))
        ours = D.soft_target_cross_entropy(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w),
                                           temperature)
        np.testing.assert_allclose(float(ours), hand, rtol=1e-5)
    # The T^2 factor keeps the soft-target gradient's scale as T grows (Hinton et al.): for
    # large T the gradient approaches (s - t) / N, independent of T.
    grads = [jax.grad(lambda x, T=T: D.soft_target_cross_entropy(
        x, jnp.asarray(t), jnp.ones((2, 5)), T))(jnp.asarray(s)) for T in (20.0, 40.0)]
    ratio = float(jnp.linalg.norm(grads[1]) / jnp.linalg.norm(grads[0]))
    assert 0.95 < ratio < 1.05


def test_encoder_distillation_weights_its_terms_like_distilbert():
    rng = np.random.RandomState(1)
    b, p, v, length, h = 2, 4, 9, 6, 8
    student = {"mlm_logits": jnp.asarray(rng.randn(b, p, v)),
               "last_hidden_state": jnp.asarray(rng.randn(b, length, h))}
    teacher = {"mlm_logits": jnp.asarray(rng.randn(b, p, v)),
               "last_hidden_state": jnp.asarray(rng.randn(b, length, h))}
    targets = rng.randint(0, v, (b, p))
    weights = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    tokens = np.ones((b, length), np.float32)
    tokens[1, 4:] = 0
    features = {"targets": jnp.asarray(targets), "weights": jnp.asarray(weights),
                "attention_mask": jnp.asarray(tokens)}
    sums = D.encoder_distillation(student, teacher, features, D.DistillWeights())
    T, n = 2.0, weights.sum()
    s, t = np.asarray(student["mlm_logits"]), np.asarray(teacher["mlm_logits"])
    soft = T**2 * np.sum(weights * -np.sum(_np_softmax(t / T) * np.log(_np_softmax(s / T)), -1))
    log_p = np.log(_np_softmax(s))
    hard = np.sum(weights * -np.take_along_axis(log_p, targets[..., None], -1)[..., 0])
    hs, ht = np.asarray(student["last_hidden_state"]), np.asarray(teacher["last_hidden_state"])
    cos = np.sum(hs * ht, -1) / (np.linalg.norm(hs, axis=-1) * np.linalg.norm(ht, axis=-1))
    cos_mean = np.sum((1 - cos) * tokens) / tokens.sum()
    # loss / weight = 5 * mean soft + 2 * mean hard + 1 * mean (1 - cos)
    expected = 5 * soft / n + 2 * hard / n + cos_mean
    np.testing.assert_allclose(float(sums["loss"] / sums["weight"]), expected, rtol=1e-5)


def test_hidden_and_attention_terms_map_layers_and_project():
    rng = np.random.RandomState(2)
    b, length, hs, ht = 2, 5, 4, 6
    student_h = rng.randn(3, b, length, hs)  # 2 layers + embeddings
    teacher_h = rng.randn(5, b, length, ht)  # 4 layers + embeddings
    proj = rng.randn(hs, ht)
    att_s, att_t = rng.rand(2, b, 2, length, length), rng.rand(4, b, 2, length, length)
    tokens = np.ones((b, length), np.float32)
    w = D.DistillWeights(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_hidden_mse=1.0,
                         alpha_attention=1.0)
    logits = jnp.zeros((b, 1, 3))
    student = {"mlm_logits": logits, "last_hidden_state": jnp.asarray(student_h[-1]),
               "hidden_states": jnp.asarray(student_h), "attentions": jnp.asarray(att_s)}
    teacher = {"mlm_logits": logits, "last_hidden_state": jnp.asarray(teacher_h[-1]),
               "hidden_states": jnp.asarray(teacher_h), "attentions": jnp.asarray(att_t)}
    features = {"targets": jnp.zeros((b, 1), jnp.int32), "weights": jnp.ones((b, 1)),
                "attention_mask": jnp.asarray(tokens)}
    sums = D.encoder_distillation(student, teacher, features, w,
                                  lambda x: jnp.einsum("...i,io->...o", x, proj))
    assert list(D.layer_map(2, 4)) == [0, 2, 4]
    mse = sum(np.mean((student_h[i] @ proj - teacher_h[j]) ** 2) for i, j in
              ((0, 0), (1, 2), (2, 4)))
    att = np.mean((att_s[0] - att_t[1]) ** 2) + np.mean((att_s[1] - att_t[3]) ** 2)
    np.testing.assert_allclose(float(sums["loss"] / sums["weight"]), mse + att, rtol=1e-5)


def test_task_distillation_adds_weighted_soft_and_hard_terms():
    rng = np.random.RandomState(3)
    s, t = rng.randn(6, 3), rng.randn(6, 3)
    labels = rng.randint(0, 3, 6)
    sums = D.task_distillation(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels),
                               jnp.ones(6), temperature=3.0, alpha_soft=0.7, alpha_hard=0.3)
    soft = 9.0 * np.sum(-np.sum(_np_softmax(t / 3) * np.log(_np_softmax(s / 3)), -1))
    hard = np.sum(-np.log(_np_softmax(s))[np.arange(6), labels])
    np.testing.assert_allclose(float(sums["loss"]), 0.7 * soft + 0.3 * hard, rtol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_distilbert_init_copies_every_other_teacher_layer(scan):
    teacher_config = EncoderConfig(**{**SMALL, "num_layers": 4}, scan_layers=scan)
    student_config = EncoderConfig(**SMALL, scan_layers=scan)
    teacher = _params(EncoderModel(teacher_config, rngs=nnx.Rngs(0)))
    student = _params(EncoderModel(student_config, rngs=nnx.Rngs(1)))
    init = D.distilbert_init(teacher, 4, student, 2)
    layer = (lambda p, i: jax.tree.map(lambda a: a[i], p["encoder"]["layers"])) if scan else \
        (lambda p, i: p["encoder"]["layers"][i])
    for s_index, t_index in ((0, 0), (1, 2)):
        for a, b in zip(jax.tree.leaves(layer(init, s_index)),
                        jax.tree.leaves(layer(teacher, t_index)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(init["embeddings"]["word_embeddings"],
                                  teacher["embeddings"]["word_embeddings"])
    np.testing.assert_array_equal(init["mlm"]["bias"], teacher["mlm"]["bias"])


# --------------------------------------------------------------------------- quantization


def test_fake_quant_error_is_at_most_half_a_step_and_values_sit_on_the_grid():
    x = jnp.asarray(np.random.RandomState(4).randn(10_000) * 3)
    r = jnp.max(jnp.abs(x))
    y = Q.fake_quant(x, r)
    step = float(r) / 127  # 1 / scale
    assert float(jnp.max(jnp.abs(y - x))) <= step / 2 * (1 + 1e-5)
    grid = np.asarray(y) / step
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
    assert len(np.unique(np.round(grid))) <= 255
    # With a range below max|x|, values beyond it are clipped to +-range.
    z = Q.fake_quant(x, r / 2)
    assert float(jnp.max(jnp.abs(z))) == pytest.approx(float(r) / 2, rel=1e-6)


def test_straight_through_gradient_is_identity_inside_the_range_and_zero_outside():
    x = jnp.linspace(-3.0, 3.0, 61)
    g = jax.grad(lambda v: jnp.sum(Q.fake_quant(v, jnp.asarray(2.0)) * jnp.arange(61.0)))(x)
    inside = np.abs(np.asarray(x)) <= 2.0
    np.testing.assert_array_equal(np.asarray(g)[inside], np.arange(61.0)[inside])
    np.testing.assert_array_equal(np.asarray(g)[~inside], 0.0)
    # The range itself gets no gradient (it is an EMA, not a learned clip).
    assert float(jax.grad(lambda r: jnp.sum(Q.fake_quant(x, r)))(2.0)) == 0.0


def test_ema_takes_the_first_observation_then_decays_at_0_9999():
    assert float(Q.ema(jnp.asarray(0.0), jnp.asarray(3.0))) == 3.0
    np.testing.assert_allclose(float(Q.ema(jnp.asarray(3.0), jnp.asarray(5.0))),
                               0.9999 * 3.0 + 0.0001 * 5.0, rtol=1e-7)


def _fake_model_with_ranges(scan):
    config = EncoderConfig(**SMALL, quantize="fake", scan_layers=scan)
    model = EncoderModel(config, rngs=nnx.Rngs(0))
    params = _params(model)
    ids, mask = _batch()
    for seed in range(3):  # ranges from a few batches, as training would set them
        ids_s, mask_s = _batch(seed)
        seen = _with(config, params)(ids_s, mask_s)["activation_absmax"]
        params = Q.update_ranges(params, seen, decay=0.5)
    return config, params, ids, mask


@pytest.mark.parametrize("scan", [True, False])
def test_int8_export_reloads_to_the_fake_quantized_logits(scan, tmp_path):
    config, params, ids, mask = _fake_model_with_ranges(scan)
    ranges = [v for p, v in jax.tree_util.tree_leaves_with_path(params)
              if "input_range" in str(p)]
    assert ranges and all(np.all(np.asarray(r) > 0) for r in ranges)
    fake = _with(config, params)(ids, mask)["mlm_logits"]
    artifacts.save(tmp_path / "fake", config, params)
    artifacts.save(tmp_path / "int8", Q.int8_config(config), Q.to_int8(params))
    loaded_config, loaded, _ = artifacts.load(tmp_path / "int8")
    assert loaded_config.quantize == "int8"
    kernel = (loaded["encoder"]["layers"]["attention"]["query"]["kernel"] if scan
              else loaded["encoder"]["layers"][0]["attention"]["query"]["kernel"])
    assert kernel.dtype == np.int8 and np.abs(kernel).max() == 127
    assert loaded["embeddings"]["word_embeddings"].dtype == np.int8
    int8 = jax.jit(lambda i, m: _with(loaded_config, loaded)(i, m)["mlm_logits"])(ids, mask)
    np.testing.assert_allclose(np.asarray(int8), np.asarray(fake), atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.asarray(int8).argmax(-1), np.asarray(fake).argmax(-1))
    # The integer model really multiplies int8 by int8 into int32.
    hlo = jax.jit(lambda i, m: _with(loaded_config, loaded)(i, m)["mlm_logits"]).lower(
        ids, mask).as_text()
    assert "xi8>" in hlo and "-> tensor<3x12x4x4xi32>" in hlo
    # Every dense kernel and embedding table shrinks 4x; each gains one float32 scale per
    # layer it holds; biases, norms and ranges stay float32.
    nbytes = lambda tree: sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    matrices = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
                if p[-1].key == "kernel" or p[-1].key.endswith("embeddings")]
    scales = [v for p, v in jax.tree_util.tree_leaves_with_path(loaded)
              if p[-1].key.endswith("_scale")]
    assert nbytes(loaded) == (nbytes(params) - sum(m.nbytes for m in matrices) * 3 // 4
                              + sum(np.asarray(s).nbytes for s in scales))
    assert artifacts.folder_bytes(tmp_path / "int8") < 0.5 * artifacts.folder_bytes(
        tmp_path / "fake")


def test_quantization_aware_training_moves_float_weights_through_the_quantizer():
    config = EncoderConfig(**SMALL, quantize="fake", scan_layers=True)
    params = _params(EncoderModel(config, rngs=nnx.Rngs(0)))
    ids, mask = _batch()

    def loss(p):
        logits = _with(config, p)(ids, mask)["mlm_logits"]
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    grads = jax.grad(loss)(params)
    query = grads["encoder"]["layers"]["attention"]["query"]
    assert float(jnp.abs(query["kernel"]).max()) > 0  # STE: weights learn
    assert float(jnp.abs(query["input_range"]).max()) == 0  # ranges move by EMA only


# --------------------------------------------------------------------------- pruning


def test_cubic_sparsity_schedule_values():
    values = [float(P.cubic_sparsity(s, 0.9, 100, 200)) for s in (0, 99, 100, 150, 175, 200,
                                                                  300)]
    # Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3
    np.testing.assert_allclose(values, [0.0, 0.0, 0.0, 0.9 - 0.9 / 8, 0.9 - 0.9 / 64, 0.9,
                                        0.9], rtol=1e-6)


def test_magnitude_and_movement_pruning_reach_the_sparsity_per_matrix():
    config = EncoderConfig(**SMALL, scan_layers=True)
    old = _params(EncoderModel(config, rngs=nnx.Rngs(0)))
    new = jax.tree.map(lambda a: a * 1.01, old)
    pruned, _ = P.apply_pruning(old, new, None, method="magnitude", sparsity=jnp.asarray(0.5))
    q_old = np.asarray(new["encoder"]["layers"]["attention"]["query"]["kernel"][0])
    q = np.asarray(pruned["encoder"]["layers"]["attention"]["query"]["kernel"][0])
    assert (q == 0).mean() == 0.5
    assert np.abs(q_old[q == 0]).max() <= np.abs(q_old[q != 0]).min()  # smallest |W| went
    assert P.sparsity_of(pruned) == pytest.approx(0.5)
    scores = {P.score_key(p): jnp.zeros_like(P._get(old, p)) for p in P.prunable_paths(old)}
    pruned, scores = P.apply_pruning(old, new, scores, method="movement",
                                     sparsity=jnp.asarray(0.25))
    assert P.sparsity_of(pruned) == pytest.approx(0.25)
    key = P.score_key(("encoder", "layers", "ffn", "wi", "kernel"))
    w = old["encoder"]["layers"]["ffn"]["wi"]["kernel"]
    np.testing.assert_allclose(scores[key], w * (0.01 * w), rtol=1e-5)


def _torch_bert(tmp_path):
    import torch
    import transformers

    from t5x_like.interop import hf

    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=32,
                                        max_position_embeddings=16, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    torch_model = transformers.BertForMaskedLM(hf_config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, config = hf.load(tmp_path, scan_layers=False)
    return torch_model, model, config


def test_head_mask_and_attention_maps_match_transformers(tmp_path):
    import torch

    torch_model, model, config = _torch_bert(tmp_path)
    ids, mask = _batch()
    head_mask = np.array([[1, 0, 1, 1], [0.5, 1, 0, 1]], np.float32)
    ours = model(ids, mask, output_attentions=True, head_mask=jnp.asarray(head_mask))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(np.asarray(ids)),
                             attention_mask=torch.tensor(np.asarray(mask)),
                             head_mask=torch.tensor(head_mask), output_attentions=True)
    np.testing.assert_allclose(np.asarray(ours["mlm_logits"]), theirs.logits.numpy(),
                               atol=1e-4)
    # transformers returns the maps after the head mask; ours before it.
    maps = np.asarray(ours["attentions"]) * head_mask[:, None, :, None, None]
    np.testing.assert_allclose(maps, np.stack([a.numpy() for a in theirs.attentions]),
                               atol=1e-5)


def _mlm_loss(config, params, ids, mask):
    targets = jnp.roll(ids, 1, axis=1)

    def loss(head_mask, batch):
        logits = _with(config, params)(batch[0], batch[1], head_mask=head_mask)["mlm_logits"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, batch[2][..., None], -1))

    return loss, [(ids, mask, targets), (*_batch(7), jnp.roll(_batch(7)[0], 1, axis=1))]


def test_head_importance_ranks_a_zeroed_head_last():
    config = EncoderConfig(**SMALL, scan_layers=False)
    params = _params(EncoderModel(config, rngs=nnx.Rngs(0)))
    # Head 2 of layer 1 made useless: its value projection outputs exactly 0.
    value = params["encoder"]["layers"][1]["attention"]["value"]
    value["kernel"] = value["kernel"].at[:, 2].set(0.0)
    value["bias"] = value["bias"].at[2].set(0.0)
    ids, mask = _batch()
    loss, batches = _mlm_loss(config, params, ids, mask)
    importance = P.head_importance(loss, 2, 4, batches)
    assert importance[1, 2] == 0.0
    assert np.unravel_index(np.argmin(importance), importance.shape) == (1, 2)
    assert (np.delete(importance.ravel(), 1 * 4 + 2) > 0).all()
    assert P.heads_to_keep(importance, 1) == [[0, 1, 2, 3], [0, 1, 3]]


def test_removing_heads_shrinks_arrays_and_equals_the_masked_model():
    config = EncoderConfig(**SMALL, scan_layers=False)
    params = _params(EncoderModel(config, rngs=nnx.Rngs(0)))
    keep = [[0, 3], [1, 2, 3]]
    pruned, small = P.remove_heads(params, config, keep)
    assert small.layer_num_heads == (2, 3)
    attention = pruned["encoder"]["layers"][0]["attention"]
    assert attention["query"]["kernel"].shape == (16, 2, 4)
    assert attention["value"]["bias"].shape == (2, 4)
    assert attention["out"]["kernel"].shape == (2, 4, 16)
    assert pruned["encoder"]["layers"][1]["attention"]["key"]["kernel"].shape == (16, 3, 4)
    ids, mask = _batch()
    head_mask = np.zeros((2, 4), np.float32)
    for layer, heads in enumerate(keep):
        head_mask[layer, heads] = 1
    masked = _with(config, params)(ids, mask, head_mask=jnp.asarray(head_mask))
    removed = _with(small, pruned)(ids, mask, output_attentions=True)
    np.testing.assert_allclose(np.asarray(removed["mlm_logits"]),
                               np.asarray(masked["mlm_logits"]), atol=1e-5)
    count = lambda p: sum(np.size(x) for x in jax.tree.leaves(p))  # noqa: E731
    # 3 heads gone, each with q/k/v kernels [16, 4] and biases [4], and out rows [4, 16]
    assert count(params) - count(pruned) == 3 * (3 * (16 * 4 + 4) + 4 * 16)
    assert np.asarray(removed["attentions"])[0, :, 2:].max() == 0  # removed maps are zeros
    # A layer may lose all its heads: only the output bias remains.
    none, empty = P.remove_heads(params, config, [[], [0, 1, 2, 3]])
    head_mask = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    np.testing.assert_allclose(
        np.asarray(_with(empty, none)(ids, mask)["mlm_logits"]),
        np.asarray(_with(config, params)(ids, mask, head_mask=jnp.asarray(head_mask))
                   ["mlm_logits"]), atol=1e-5)


def test_bad_compression_settings_are_one_sentence():
    from t5x_like.errors import UserError

    with pytest.raises(UserError, match="layer_num_heads"):
        EncoderConfig(**SMALL, layer_num_heads=(2, 2))  # scanned
    with pytest.raises(UserError, match="quantize"):
        EncoderConfig(**SMALL, quantize="fake", layer_sharing="ffn")
    with pytest.raises(UserError, match="scan_layers=False"):
        P.remove_heads({}, EncoderConfig(**SMALL), [[0], [0]])
    with pytest.raises(UserError, match="widths"):
        D.distilbert_init(_params(EncoderModel(EncoderConfig(**SMALL), rngs=nnx.Rngs(0))), 2,
                          _params(EncoderModel(dataclasses.replace(
                              EncoderConfig(**SMALL), hidden_size=8, num_heads=2),
                              rngs=nnx.Rngs(0))), 2)
