"""The dense matmul's CPU backward (kernel gradient as transposed rows times dy, row-major)
gives the plain matmul's values and gradients, and runs only where it was measured to help."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import activation_sharding, cpu_matmul
from t5x_like.models.layers import dense, rematerialise


def _inputs(dtype=jnp.float32, k=16, n=40):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, k)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, n)) * 0.3, dtype)
    weights = jnp.asarray(rng.standard_normal((3, 5, n)), jnp.float32)
    return x, kernel, weights


def _loss(matmul):
    return lambda x, kernel, w: jnp.sum(matmul(x, kernel) * w)


def _ours(x, kernel):
    return dense(x, kernel, preferred_element_type=jnp.float32)


def _plain(x, kernel):
    return jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)


def _kernel_gradient_hlo(x, kernel, w) -> str:
    return jax.jit(jax.grad(_loss(_ours), argnums=1)).lower(x, kernel, w).compile().as_text()


def _barriers(matmul, x, kernel, w) -> int:
    return str(jax.make_jaxpr(jax.grad(_loss(matmul), argnums=1))(x, kernel, w)).count(
        "optimization_barrier")


# autodiff's kernel gradient: rows^T dy, both operands contracted over their leading (token) axis
_TOKEN_CONTRACTING_DOT = re.compile(r"f32\[16,40\]\S* dot\(.*lhs_contracting_dims=\{0\}, "
                                    r"rhs_contracting_dims=\{0\}")


@pytest.mark.parametrize("k, n", [(16, 40), (40, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_the_plain_matmul(dtype, k, n):
    x, kernel, w = _inputs(dtype, k, n)
    assert cpu_matmul.rows_t_gradient_helps(x, kernel, None) == (dtype == jnp.float32)
    value_and_grads = lambda f: jax.jit(jax.value_and_grad(_loss(f), argnums=(0, 1)))  # noqa: E731
    ours = value_and_grads(_ours)(x, kernel, w)
    ref = value_and_grads(_plain)(x, kernel, w)
    assert ours[1][0].dtype == dtype and ours[1][1].dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours[0], ref[0], rtol=tol)
    for a, b in zip(ours[1], ref[1], strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def test_the_cpu_backward_multiplies_transposed_rows_row_major():
    hlo = _kernel_gradient_hlo(*_inputs())
    assert not _TOKEN_CONTRACTING_DOT.search(hlo)
    assert re.search(r"f32\[16,40\]\S* dot\(.*lhs_contracting_dims=\{1\}, "
                     r"rhs_contracting_dims=\{0\}", hlo)


def test_where_rows_are_wider_the_backward_transposes_dy_instead():
    """rows [15, 40] against dy [15, 16]: dy^T rows is the row-major product, [16, 40],
    transposed back to the kernel's [40, 16]."""
    hlo = _kernel_gradient_hlo(*_inputs(k=40, n=16))
    assert not re.search(r"dot\(.*lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{0\}", hlo)
    assert re.search(r"f32\[16,40\]\S* dot\(.*lhs_contracting_dims=\{1\}, "
                     r"rhs_contracting_dims=\{0\}", hlo)


def test_a_multi_device_step_gets_the_plain_matmul():
    """Inside a step traced over several devices (the resolver's shardings span two), the
    backward is autodiff's own: the barrier could disturb sharding propagation."""

    class TwoDeviceSharding:
        device_set = frozenset({0, 1})

    x, kernel, w = _inputs()
    with activation_sharding.resolving(lambda names, shape: TwoDeviceSharding()):
        assert not cpu_matmul.rows_t_gradient_helps(x, kernel, None)
        hlo = _kernel_gradient_hlo(x, kernel, w)
    assert _TOKEN_CONTRACTING_DOT.search(hlo)


@pytest.mark.parametrize("k, n", [(16, 40), (40, 16)])
def test_a_rematerialised_layer_transposes_its_materialised_rows(k, n):
    """Under ``layers.rematerialise`` (``run_stack``'s and ALBERT's shared-layer remat) the rows
    are recomputed in the backward pass: the kernel gradient is still the row-major product,
    after a barrier that makes the recomputed rows (and dy) buffers of their own, and equals
    the plain matmul's."""
    x, kernel, w = _inputs(k=k, n=n)
    remat = rematerialise(_ours, "full", prevent_cse=True)
    grad = jax.jit(jax.grad(_loss(remat), argnums=(0, 1)))
    assert _barriers(remat, x, kernel, w) == _barriers(_ours, x, kernel, w) + 1
    hlo = grad.lower(x, kernel, w).compile().as_text()
    assert not re.search(r"dot\(.*lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{0\}", hlo)
    plain = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1)))(x, kernel, w)
    for a, b in zip(grad(x, kernel, w), plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
