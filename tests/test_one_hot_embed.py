"""The embedding's one-hot lookup (taken inside a step on several devices, as T5X's
``Embed(one_hot=True)``) gives the gather's numbers: outputs and every gradient of a tiny T5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.models import activation_sharding, layers
from t5x_like.models.t5 import T5, T5Config

TINY = dict(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_encoder_layers=1,
            num_decoder_layers=1, relative_attention_num_buckets=8,
            relative_attention_max_distance=20)


@functools.cache
def _initial():
    """(graphdef, params), initialised in one jitted call: eager init compiles op by op."""
    def make():
        return T5(T5Config(**TINY, scan_layers=False), rngs=nnx.Rngs(0))

    return nnx.graphdef(nnx.eval_shape(make)), jax.jit(lambda: nnx.state(make(), nnx.Param))()


def _outputs_and_grads(one_hot: bool):
    """The encoder's output and every gradient of a loss over it; the decoder's embedding is
    the same module (a shared table), so the encoder exercises it."""
    model = nnx.merge(*_initial())
    model.token_embedder.one_hot = one_hot
    rng = np.random.RandomState(0)
    # repeated ids: their gradient rows are sums, which the two paths add in different orders
    enc = rng.randint(2, 40, (3, 14))
    enc[1, 10:] = 0
    weights = jnp.asarray(rng.randn(3, 14, TINY["d_model"]), jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        out = nnx.merge(graphdef, p).encode(enc)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(out), nnx.to_pure_dict(grads)


def test_one_hot_lookup_gives_the_gathers_outputs_and_gradients():
    ref_out, ref_grads = _outputs_and_grads(False)
    out, grads = _outputs_and_grads(True)
    np.testing.assert_array_equal(out, ref_out)  # the lookup itself is the same gather
    table = np.asarray(grads["token_embedder"]["embedding"])
    assert np.abs(table[2:40]).max() > 0 and np.abs(table[40:]).max() == 0  # looked-up rows
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        scale = max(float(np.abs(b).max()), 1e-30)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


def test_the_lookup_is_a_gather_outside_a_multi_device_step():
    """Only a step whose mesh has several devices (``with_activation_sharding``) switches the
    default (``one_hot=None``) embedding to the matmul; one device and decoding keep the
    gather."""
    embed = layers.Embed(96, 32, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = jnp.array([[3, 5, 3]])
    assert activation_sharding.step_devices() == 1
    text = str(jax.make_jaxpr(embed)(ids))
    assert "gather" in text and "dot_general" not in text
    np.testing.assert_array_equal(embed(ids), embed.embedding[...][np.array([[3, 5, 3]])])
