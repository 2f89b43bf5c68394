"""The untied LM head's logits: the CPU backward (the kernel's gradient computed as
[vocab, embed] and transposed) gives the plain matmul's values and gradients, and runs only
where it was measured to help."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import activation_sharding, vocab_logits


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), dtype)
    kernel = jnp.asarray(rng.standard_normal((16, 40)) * 0.3, dtype)
    weights = jnp.asarray(rng.standard_normal((3, 5, 40)), jnp.float32)
    return x, kernel, weights


def _loss(logits_fn):
    return lambda x, kernel, w: jnp.sum(logits_fn(x, kernel) * w)


def _plain(x, kernel):
    return jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_the_plain_matmul(dtype):
    x, kernel, w = _inputs(dtype)
    assert vocab_logits.transposed_gradient_helps()  # CPU, outside any multi-device step
    value_and_grads = lambda f: jax.jit(jax.value_and_grad(_loss(f), argnums=(0, 1)))  # noqa: E731
    ours = value_and_grads(vocab_logits.vocab_logits)(x, kernel, w)
    ref = value_and_grads(_plain)(x, kernel, w)
    assert ours[1][0].dtype == dtype and ours[1][1].dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours[0], ref[0], rtol=tol)
    for a, b in zip(ours[1], ref[1], strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def test_the_cpu_backward_computes_the_kernel_gradient_as_vocab_by_embed():
    x, kernel, w = _inputs()
    grad = jax.jit(jax.grad(_loss(vocab_logits.vocab_logits), argnums=1))
    hlo = grad.lower(x, kernel, w).compile().as_text()
    assert "f32[40,16]{1,0} dot(" in hlo  # [vocab, embed]
    assert "f32[16,40]{1,0} dot(" not in hlo


def test_a_multi_device_step_gets_the_plain_matmul():
    """Inside a step traced over several devices (the resolver's shardings span two), the
    backward is autodiff's own: the transposed form could disturb sharding propagation."""

    class TwoDeviceSharding:
        device_set = frozenset({0, 1})

    with activation_sharding.resolving(lambda names, shape: TwoDeviceSharding()):
        assert not vocab_logits.transposed_gradient_helps()
        x, kernel, w = _inputs()
        hlo = jax.jit(jax.grad(_loss(vocab_logits.vocab_logits), argnums=1)).lower(
            x, kernel, w).compile().as_text()
    assert "f32[40,16]{1,0} dot(" not in hlo
