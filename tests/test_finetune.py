"""Fine-tuning modes: which parameters move, what is saved, what reloads, LoRA's algebra,
prompt/prefix/adapter installation, gradual unfreezing order, the heads' math.

Every mode trains a few real trainer steps (``train.make_train_step``) of a tiny encoder with a
classification head, or a tiny T5 text-to-text; parameters are compared leaf by leaf with the
initial ones; the trainer's checkpoint is written and read back through ``Experiment`` (the
frozen pretrained part merged back) and must give the same predictions.
"""

from __future__ import annotations

import ast
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like import config as config_lib
from t5x_like import train as train_lib
from t5x_like.checkpoints import Checkpoints
from t5x_like.errors import UserError
from t5x_like.experiment import build
from t5x_like.finetune import checkpoint as ft_checkpoint
from t5x_like.finetune import heads, modes, peft
from t5x_like.finetune.peft import leaves_with_paths

LABELS = ("hamlet", "dream", "henry", "caesar", "tempest")
SMALL = {"finetune.prompt_length": 4, "finetune.prefix_length": 3,
         "finetune.prefix_hidden": 16, "finetune.adapter_size": 4, "finetune.lora_rank": 2,
         "finetune.stage_steps": 2, "data.inputs_length": 16, "data.batch_size": 4,
         "optimizer.name": "adamw", "optimizer.learning_rate": 3e-2,
         "optimizer.schedule": "constant", "optimizer.weight_decay": 0.0,
         "train.progress_bar": False}


def make_config(family: str, mode: str, **overrides):
    c = config_lib.base_config(family)
    if family == "t5_finetune":
        c.model.update(dict(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=2,
                            num_decoder_layers=2, scan_layers=False))
        c.data.task = "play_lines"
    elif family == "bart_finetune":
        c.model.update(dict(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                            num_decoder_layers=1, max_position_embeddings=64,
                            scan_layers=False, dropout_rate=0.0))
        c.data.task = "play_lines"
    else:
        c.model.update(dict(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2,
                            max_position_embeddings=64, scan_layers=False,
                            hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        c.finetune.label_names = LABELS
        c.data.task = "play_lines"
    for key, value in {**SMALL, "finetune.mode": mode, **overrides}.items():
        config_lib._assign(c, key, value)
    config_lib.validate(c)
    return c


@functools.cache
def experiment(family: str, mode: str, **overrides):
    return build(make_config(family, mode, **overrides))


def synthetic_batch(exp, seed: int = 0) -> dict:
    """A fixed labelled batch (no data pipeline: these tests are about parameters)."""
    rng = np.random.default_rng(seed)
    b, length = exp.config.data.batch_size, exp.config.data.inputs_length
    ids = rng.integers(3, 500, (b, length)).astype(np.int32)
    if exp.config.family in ("t5_finetune", "bart_finetune"):
        targets = np.zeros((b, exp.config.finetune.targets_length), np.int32)
        targets[:, :2] = rng.integers(3, 500, (b, 2))
        targets[:, 2] = 1
        return {"inputs": ids, "targets": targets}
    mask = np.ones((b, length), np.int32)
    mask[:, length - 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask,
            "label": rng.integers(0, len(LABELS), b).astype(np.int32),
            "valid": np.ones(b, np.float32)}


def train_steps(exp, state, n: int, seed: int = 0):
    step = train_lib.make_train_step(exp)
    for i in range(n):
        state, _ = step(state, synthetic_batch(exp, seed + i))
    return state


def changed_leaves(before, after) -> dict[str, bool]:
    diff = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                        jax.device_get(before), jax.device_get(after))
    return {"/".join(map(str, path)): flag for path, flag in leaves_with_paths(diff)}


def predictions(exp, params, batch) -> np.ndarray:
    """Head outputs, or T5's teacher-forced logits (greedy decoding is their argmax chain,
    test_finetune_t5.py checks that; the logits compile much faster)."""
    if exp.config.family in ("t5_finetune", "bart_finetune"):
        from t5x_like.families.t5 import shift_right

        return np.asarray(exp.family.logits(params, batch["inputs"],
                                            shift_right(batch["targets"])))
    return np.asarray(exp.family.outputs(params, batch))


# --------------------------------------------------------------------------- each mode

ENCODER_MODES = ("full", "feature", "adapters", "lora", "prompt", "prefix")



def _check_mode(family: str, mode: str, tmp_path):
    exp = experiment(family, mode)
    state = exp.initial_state()
    initial = jax.device_get(state["params"])
    state = train_steps(exp, state, 3)
    changed = changed_leaves(initial, state["params"])
    frozen_model = mode in modes.FROZEN_MODEL_MODES
    for name, moved in changed.items():
        part = name.split("/")[0]
        should = not (frozen_model and part == "model")
        assert moved == should, f"{mode}: {name} moved={moved}, expected {should}"
    assert set(n.split("/")[0] for n in changed) == set(initial)
    # no optimizer state for frozen leaves: Adam's moments exist only for trainable leaves
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    trainable = sum(x.size for x in jax.tree.leaves(
        ft_checkpoint.trainable_part(initial, mode)))
    assert moments <= 2 * trainable + 8
    # the trainer's checkpoint, then the same predictions after a restore
    batch = synthetic_batch(exp, 99)
    before = predictions(exp, state["params"], batch)
    ckpt = Checkpoints(tmp_path / mode)
    ckpt.save(3, exp.saved_state(state), {"batches_consumed": 3})
    ckpt.close()
    saved_params = ckpt.directory / "3" / "state"
    restored, _ = exp.restore(Checkpoints(tmp_path / mode, read_only=True))
    np.testing.assert_array_equal(predictions(exp, restored["params"], batch), before)
    assert int(restored["step"]) == int(state["step"])
    # a frozen-model mode saves only the head / PEFT tensors (orbax's index of the tree)
    index = json.loads((saved_params / "_METADATA").read_text())["tree_metadata"]
    saved = {ast.literal_eval(k)[1:] for k in index if ast.literal_eval(k)[0] == "params"}
    expected = {tuple(map(str, p)) for p, _ in leaves_with_paths(
        ft_checkpoint.trainable_part(initial, mode))}
    assert saved == expected
    assert any(p[0] == "model" for p in saved) == (not frozen_model)


# Adapters, prompt and prefix tuning (each saves only its trainable part and reloads) in the
# default run. LoRA's save-and-reload runs there as bart_finetune's LoRA below and as
# tests/test_finetune_data.py's LoRA run from a pretrained checkpoint; feature extraction's
# frozen encoder as test_feature_mode_with_a_weighted_sum_trains_the_mix_only; the rest: -m slow.
@pytest.mark.parametrize("mode", [m if m in ("adapters", "prompt", "prefix") else
                                  pytest.param(m, marks=pytest.mark.slow) for m in ENCODER_MODES])
def test_encoder_modes_train_only_their_parameters_and_reload(mode, tmp_path):
    _check_mode("bert_finetune", mode, tmp_path)


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_bart_finetune_trains_only_its_parameters_and_reloads(mode, tmp_path):
    """The bart_finetune family through the real train step: LoRA moves only its factors,
    saves only them, and the reloaded model predicts the same logits."""
    _check_mode("bart_finetune", mode, tmp_path)


@pytest.mark.slow
def test_gradual_unfreezing_starts_at_the_top_layer():
    exp = experiment("bert_finetune", "gradual")  # 2 layers, stage_steps=2
    state = exp.initial_state()
    start = jax.device_get(state["params"])

    def moved(params, prefix):
        flags = changed_leaves(start, params)
        return any(v for k, v in flags.items() if k.startswith(prefix))

    state = train_steps(exp, state, 2)  # stage 0: head, pooler, top layer
    p = state["params"]
    assert moved(p, "head") and moved(p, "model/pooler") and moved(p, "model/encoder/layers/1")
    assert not moved(p, "model/encoder/layers/0") and not moved(p, "model/embeddings")
    state = train_steps(exp, state, 2, seed=2)  # stage 1: + layer 0
    p = state["params"]
    assert moved(p, "model/encoder/layers/0") and not moved(p, "model/embeddings")
    state = train_steps(exp, state, 1, seed=4)  # stage 2: + embeddings
    assert moved(state["params"], "model/embeddings")


def test_gradual_stages_of_a_scanned_t5_stack():
    params = {"model": {"encoder": {"layers": {"w": jnp.zeros((3, 2))}, "final_norm": {}},
                        "decoder": {"layers": {"w": jnp.zeros((2, 2))}},
                        "token_embedder": {"embedding": jnp.zeros((4, 2))}}}
    stages, count = modes.layer_stages(params, ("encoder", "decoder"),
                                       {"encoder": 3, "decoder": 2}, scan=True)
    # decoder top (layer 1) first, then decoder 0, encoder 2, 1, 0, then the embeddings
    np.testing.assert_array_equal(stages["model"]["decoder"]["layers"]["w"], [1, 0])
    np.testing.assert_array_equal(stages["model"]["encoder"]["layers"]["w"], [4, 3, 2])
    assert int(stages["model"]["token_embedder"]["embedding"]) == 5 and count == 6


def test_frozen_leaves_have_no_optimizer_state():
    params = {"model": {"w": jnp.ones((50, 50))}, "head": {"k": jnp.ones((3,))}}
    tx = modes.optimizer(optax.adam(1e-2), params, "lora")
    sizes = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    assert sizes == 2 * 3 + 1  # mu, nu of the head + adam's count; nothing for the model
    updates, _ = tx.update({"model": {"w": jnp.ones((50, 50))}, "head": {"k": jnp.ones(3)}},
                           tx.init(params), params)
    assert not np.any(updates["model"]["w"]) and np.all(updates["head"]["k"] != 0)


# --------------------------------------------------------------------------- LoRA


def test_lora_starts_as_identity_and_changes_w_by_rank_at_most_r():
    exp = experiment("bert_finetune", "lora")
    fam = exp.family
    state = exp.initial_state()
    base = jax.device_get(state["params"]["model"])
    scale = fam.ft.lora_alpha / fam.ft.lora_rank
    merged = peft.apply_lora(base, state["params"]["peft"], fam.base_logical, fam.lora_targets,
                             scale)
    for path in fam.lora_targets:  # B = 0: W unchanged at the start
        np.testing.assert_array_equal(peft.get_path(merged, path), peft.get_path(base, path))
    state = train_steps(exp, state, 3)
    merged = peft.apply_lora(base, jax.device_get(state["params"]["peft"]), fam.base_logical,
                             fam.lora_targets, scale)
    assert len(fam.lora_targets) == 4  # query and value of 2 layers
    for path in fam.lora_targets:
        delta = np.asarray(peft.get_path(merged, path) - peft.get_path(base, path), np.float64)
        matrix = delta.reshape(delta.shape[0], -1)  # [embed, heads * kv]
        rank = np.linalg.matrix_rank(matrix, tol=1e-6 * np.abs(matrix).max())
        assert 1 <= rank <= fam.ft.lora_rank, (path, rank)


# --------------------------------------------------------------------------- installation


def test_prefix_export_drops_the_mlp_and_keeps_predictions():
    exp = experiment("bert_finetune", "prefix")
    params = jax.device_get(exp.initial_state()["params"])
    batch = synthetic_batch(exp)
    exported = peft.export_prefix(params["peft"]["params"], exp.family.arch)
    assert set(exported) == {"encoder__keys", "encoder__values"}
    assert exported["encoder__keys"].shape == (2, 3, 2, 8)  # layers, P, heads, d_kv
    direct = {**params, "peft": {"params": exported}}
    np.testing.assert_allclose(np.asarray(exp.family.outputs(direct, batch)),
                               np.asarray(exp.family.outputs(params, batch)), rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------- heads


def test_head_losses_match_optax_and_brute_force():
    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 6))
    valid = jnp.asarray([1, 1, 1, 1, 0, 1], jnp.float32)
    sums = heads.classification_sums(out, labels, valid)
    expected = optax.softmax_cross_entropy_with_integer_labels(out, labels) * valid
    np.testing.assert_allclose(sums["loss"], expected.sum(), rtol=1e-6)
    assert sums["weight"] == 5
    # best span: brute force over start <= end < start + 3 on unmasked tokens
    out = jnp.asarray(rng.normal(size=(4, 7, 2)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [5], [3], [6]]))
    spans = np.asarray(heads.best_span(out, mask, 3))
    for row in range(4):
        n = int(mask[row].sum())
        best = max(((i, j) for i in range(n) for j in range(i, min(n, i + 3))),
                   key=lambda ij, r=row: float(out[r, ij[0], 0] + out[r, ij[1], 1]))
        assert tuple(spans[row]) == best


def test_weighted_sum_of_layers_and_chosen_layer():
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 4, 5)), jnp.float32)
    head = {"layer_weights": jnp.log(jnp.asarray([1.0, 2.0, 1.0])), "gamma": jnp.asarray(2.0)}
    expected = 2.0 * (0.25 * hidden[0] + 0.5 * hidden[1] + 0.25 * hidden[2])
    np.testing.assert_allclose(heads.mix_layers(hidden, head, -1), expected, rtol=1e-5)
    np.testing.assert_array_equal(heads.mix_layers(hidden, {}, 1), hidden[1])
    with pytest.raises(UserError, match="feature_layer"):
        heads.mix_layers(hidden, {}, 3)


def test_feature_mode_with_a_weighted_sum_trains_the_mix_only():
    exp = experiment("bert_finetune", "feature",
                     **{"finetune.feature_weighted_sum": True, "finetune.pooling": "cls"})
    state = exp.initial_state()
    start = jax.device_get(state["params"])
    assert start["head"]["layer_weights"].shape == (3,)
    flags = changed_leaves(start, train_steps(exp, state, 2)["params"])
    assert flags["head/layer_weights"] and flags["head/kernel"]
    assert not any(v for k, v in flags.items() if k.startswith("model/"))


def test_bad_finetune_configs_fail_in_one_sentence():
    with pytest.raises(UserError, match="finetune.mode"):
        make_config("bert_finetune", "frozen")
    with pytest.raises(UserError, match="label_names"):
        make_config("bert_finetune", "full", **{"finetune.label_names": ("one",)})
    with pytest.raises(UserError, match="feature"):
        make_config("t5_finetune", "feature")
    with pytest.raises(UserError, match="lora_targets"):
        experiment("bert_finetune", "lora", **{"finetune.lora_targets": ("nothing",)})
