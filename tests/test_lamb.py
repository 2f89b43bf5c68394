"""LAMB (``optimizer.name='lamb'``): three updates of the trainer's optimizer against LAMB
written out in NumPy from You et al. (2020), Algorithm 2, and ALBERT's presets carrying the
paper's optimizer settings (Lan et al., 2020, §4.1: LAMB, lr 0.00176, batch 4096, 125k steps)."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT

from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.optim import make_optimizer


def _numpy_lamb(params, grads_per_step, lr, b1, b2, eps, wd):
    """LAMB per tensor: Adam moments with bias correction, r = m/(sqrt(v)+eps) + wd w, then
    w -= lr * (||w|| / ||r||) * r (ratio 1 where either norm is 0)."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        for k in w:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            r = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps) + wd * w[k]
            wn, rn = np.linalg.norm(w[k]), np.linalg.norm(r)
            trust = wn / rn if wn > 0 and rn > 0 else 1.0
            w[k] = w[k] - lr * trust * r
    return w


def test_lamb_matches_the_papers_update_rule():
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(0, 0.02, (8, 16)).astype(np.float32),
              "bias": np.zeros(16, np.float32)}  # zero norm: trust ratio 1
    grads = [{k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    opt = ml_collections.ConfigDict(dict(name="lamb", learning_rate=0.01, schedule="constant",
                                         warmup_steps=0, b1=0.9, b2=0.999, eps=1e-6,
                                         weight_decay=0.01, grad_clip_norm=0.0))
    tx, _ = make_optimizer(opt, num_steps=10)
    state, current = tx.init(params), jax.tree.map(np.asarray, params)
    for g in grads:
        updates, state = tx.update(g, state, current)
        current = jax.tree.map(lambda p, u: np.asarray(p + u), current, updates)
    want = _numpy_lamb(params, grads, 0.01, 0.9, 0.999, 1e-6, 0.01)
    for k in params:
        np.testing.assert_allclose(current[k], want[k], rtol=1e-5, atol=1e-7)
    # The trust ratio is what makes it LAMB: the kernel moved by ~lr x its own norm per step,
    # far less than Adam's ~lr per entry would move it.
    moved = np.linalg.norm(current["kernel"] - params["kernel"])
    assert moved < 3 * 0.01 * np.linalg.norm(params["kernel"]) * 1.1


def test_albert_presets_train_with_lamb_as_the_paper():
    os.chdir(ROOT)
    base = config_lib.load_config("configs/albert_sop.py:base").optimizer
    assert (base.name, base.learning_rate, base.warmup_steps) == ("lamb", 0.00176, 3125)
    assert (base.schedule, base.weight_decay, base.eps) == ("linear", 0.01, 1e-6)
    c = config_lib.load_config("configs/albert_sop.py:base")
    assert (c.data.batch_size, c.train.num_steps) == (4096, 125_000)
    small = config_lib.load_config("configs/albert_sop.py:small").optimizer
    assert small.name == "lamb" and small.learning_rate == pytest.approx(0.00176 / 4)
    tiny = config_lib.load_config("configs/albert_sop.py:tiny", ["optimizer.name=lamb"])
    assert tiny.optimizer.name == "lamb"
    with pytest.raises(UserError, match="lamb"):
        config_lib.load_config("configs/albert_sop.py:tiny", ["optimizer.name=lars"])
