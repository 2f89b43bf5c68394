"""Cross-entropy, z-loss and label smoothing against optax and a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_like.losses import cross_entropy_with_z_loss


def _data(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    logits = 3 * jax.random.normal(k1, (2, 5, 11))
    targets = jax.random.randint(k2, (2, 5), 0, 11)
    weights = (jax.random.uniform(k3, (2, 5)) > 0.3).astype(jnp.float32)
    return logits, targets, weights


def test_cross_entropy_and_z_loss_match_optax_and_hand_count():
    logits, targets, weights = _data()
    out = cross_entropy_with_z_loss(logits, targets, weights, z_loss=1e-4)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_z = jax.scipy.special.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(out["cross_entropy"], jnp.sum(ce * weights), rtol=1e-6)
    np.testing.assert_allclose(out["z_loss"], jnp.sum(1e-4 * log_z**2 * weights), rtol=1e-6)
    np.testing.assert_allclose(out["loss"], out["cross_entropy"] + out["z_loss"], rtol=1e-6)
    assert out["weight"] == weights.sum()
    hits = (jnp.argmax(logits, -1) == targets) * weights
    assert out["correct"] == hits.sum()


def test_label_smoothing_matches_optax_minus_target_entropy():
    logits, targets, weights = _data(1)
    eps, vocab = 0.1, logits.shape[-1]
    out = cross_entropy_with_z_loss(logits, targets, weights, label_smoothing=eps)
    soft = jax.nn.one_hot(targets, vocab) * (1 - eps) + (1 - jax.nn.one_hot(targets, vocab)) * (
        eps / (vocab - 1)
    )
    entropy = -jnp.sum(soft * jnp.log(soft), axis=-1)
    expected = (optax.softmax_cross_entropy(logits, soft) - entropy) * weights
    np.testing.assert_allclose(out["cross_entropy"], expected.sum(), rtol=1e-5)


def test_padding_weights_remove_positions_entirely():
    logits, targets, _ = _data(2)
    weights = jnp.zeros_like(targets, dtype=jnp.float32).at[0, :2].set(1.0)
    out = cross_entropy_with_z_loss(logits, targets, weights)
    only = cross_entropy_with_z_loss(logits[:1, :2], targets[:1, :2], jnp.ones((1, 2)))
    np.testing.assert_allclose(out["cross_entropy"], only["cross_entropy"], rtol=1e-6)
