"""Fine-tuning T5 text-to-text in every mode that applies to it (the encoder modes and the
shared helpers are in test_finetune.py): parameters that move, saved part, reload, LoRA on
scanned stacks, adapters as the identity at init, prefixes in scanned stacks, and the
decoding path (KV cache, prompt in the encoder only) agreeing with teacher forcing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_finetune import _check_mode, experiment, predictions, synthetic_batch

from t5x_like.families.t5 import shift_right
from t5x_like.finetune import peft

T5_MODES = ("full", "adapters", "lora", "prompt", "prefix")


# -m slow: T5's LoRA run from a pretrained checkpoint, saving only LoRA and reloading, is in
# the default run as tests/test_finetune_data.py's test_lora_run_from_a_pretrained_checkpoint_...
@pytest.mark.slow
@pytest.mark.parametrize("mode", T5_MODES)
def test_t5_modes_train_only_their_parameters_and_reload(mode, tmp_path):
    _check_mode("t5_finetune", mode, tmp_path)


def test_lora_on_a_scanned_stack_is_per_layer():
    exp = experiment("t5_finetune", "lora", **{"model.scan_layers": True})
    fam = exp.family
    paths = ["/".join(map(str, p)) for p in fam.lora_targets]
    assert "encoder/layers/attention/query" in paths
    params = jax.device_get(exp.initial_state()["params"])
    a = params["peft"]["a"]["encoder__layers__attention__query"]
    b = params["peft"]["b"]["encoder__layers__attention__query"]
    assert a.shape == (2, 16, 2) and b.shape == (2, 2, 2, 4)  # [layers, in, r], [layers, r, out]
    b = np.random.default_rng(0).normal(size=b.shape)
    delta = peft.lora_delta(jnp.asarray(a), jnp.asarray(b), (2, 16, 2, 4), 1, 1.0)
    for layer in range(2):
        expected = a[layer] @ b[layer].reshape(2, -1)
        np.testing.assert_allclose(np.asarray(delta[layer]).reshape(16, -1), expected,
                                   rtol=1e-5, atol=1e-6)


def test_adapters_start_as_the_identity():
    exp = experiment("t5_finetune", "adapters")
    params = jax.device_get(exp.initial_state()["params"])
    batch = synthetic_batch(exp)
    fam = exp.family


    tuned = fam.logits(params, batch["inputs"], shift_right(batch["targets"]))
    plain = fam.model(params["model"])(batch["inputs"], shift_right(batch["targets"]))
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_prefix_on_a_scanned_t5_matches_the_unrolled_model():
    scanned = experiment("t5_finetune", "prefix", **{"model.scan_layers": True})
    unrolled = experiment("t5_finetune", "prefix")
    params = jax.device_get(scanned.initial_state()["params"])

    def unstack(tree):  # stacked [layers, ...] leaves -> {0: ..., 1: ...}
        out = {}
        for k, v in tree.items():
            if k == "layers":
                out[k] = {i: jax.tree.map(lambda a, i=i: a[i], v) for i in range(2)}
            else:
                out[k] = unstack(v) if isinstance(v, dict) else v
        return out

    flat = {**params, "model": unstack(params["model"])}
    batch = synthetic_batch(scanned)
    # Two different compiled programs (scan vs unrolled) reassociate float32 sums: equal up to
    # float32 rounding (measured max difference 1.5e-6 on logits of size ~0.1), not bit for bit.
    np.testing.assert_allclose(predictions(scanned, params, batch),
                               predictions(unrolled, flat, batch), rtol=1e-5, atol=1e-5)


    dec = shift_right(batch["targets"])
    np.testing.assert_allclose(
        np.asarray(scanned.family.logits(params, batch["inputs"], dec)),
        np.asarray(unrolled.family.logits(flat, batch["inputs"], dec)), rtol=2e-5, atol=2e-5)


def test_greedy_prediction_equals_teacher_forced_argmax_with_a_prompt():
    """The decoding path (KV cache, prompt in the encoder only) and the training path agree."""
    exp = experiment("t5_finetune", "prompt")
    params = jax.device_get(exp.initial_state()["params"])
    batch = synthetic_batch(exp)


    generated = np.asarray(exp.family.predict_batch(params, batch, max_length=4))
    logits = exp.family.logits(params, batch["inputs"], shift_right(jnp.asarray(generated)))
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1)[generated > 0],
                                  generated[generated > 0])
