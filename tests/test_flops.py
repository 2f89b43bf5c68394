"""The analytic FLOP count: pinned to a hand count, and checked against XLA's own count."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from t5x_like import flops
from t5x_like.errors import UserError
from t5x_like.models.t5 import T5, T5Config

SMALL = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_encoder_layers=2,
             num_decoder_layers=2, vocab_size=256)


def test_t5_count_matches_a_hand_count():
    """B=2 examples, L=64 encoder and T=16 decoder positions, d=64, 4 heads x 16 = 64, d_ff=128,
    gated-GELU, vocab 256, 2 + 2 layers. Every product is 2 * m * n * k."""
    terms = flops.t5_forward_flops(T5Config(**SMALL), batch=2, inputs_length=64,
                                   targets_length=16)
    layers_x_batch = 2 * 2
    enc_attention = (4 * (2 * 64 * 64) * 64  # q, k, v, out projections on 64 tokens
                     + 2 * (2 * 64 * 64) * 64)  # scores [64 x 64 keys] and weighted values
    enc_mlp = 3 * (2 * 64 * 128) * 64  # wi_0, wi_1, wo
    dec_self = 4 * (2 * 64 * 64) * 16 + 2 * (2 * 16 * 64) * 16
    dec_cross = (2 * (2 * 64 * 64) * 16  # q and out on 16 decoder tokens
                 + 2 * (2 * 64 * 64) * 64  # k and v on 64 encoder tokens
                 + 2 * (2 * 64 * 64) * 16)  # scores [16 x 64 keys] and weighted values
    dec_mlp = 3 * (2 * 64 * 128) * 16
    logits = 2 * (2 * 64 * 256) * 16
    assert terms == {
        "encoder_attention": layers_x_batch * enc_attention,
        "encoder_mlp": layers_x_batch * enc_mlp,
        "decoder_self_attention": layers_x_batch * dec_self,
        "decoder_cross_attention": layers_x_batch * dec_cross,
        "decoder_mlp": layers_x_batch * dec_mlp,
        "logits": logits,
    }
    assert sum(terms.values()) == 38_010_880
    relu = flops.t5_forward_flops(T5Config(**SMALL, feed_forward_proj="relu"), batch=2,
                                  inputs_length=64, targets_length=16)
    assert relu["encoder_mlp"] == layers_x_batch * 2 * (2 * 64 * 128) * 64


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_count_agrees_with_xla(feed_forward_proj):
    """XLA's cost analysis counts the same matmuls plus elementwise work (norms, softmax,
    GELU, masks: O(tokens x d_model) against O(tokens x d_model^2) for the matmuls), so at
    d_model 256 it may exceed ours by at most 1%, never fall below it; the gradient step is 3x
    the forward within 1% (dX and dW of every product; XLA skips a few unneeded ones).
    Layers are unrolled: XLA counts a scanned body once, whatever the trip count."""
    config = T5Config(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_encoder_layers=2,
                      num_decoder_layers=2, vocab_size=1024, scan_layers=False,
                      feed_forward_proj=feed_forward_proj)
    batch, inputs_length, targets_length = 2, 64, 16
    graphdef, params = nnx.split(T5(config, rngs=nnx.Rngs(0)), nnx.Param)

    def forward(params, x, y):
        return nnx.merge(graphdef, params)(x, y)

    x = jnp.ones((batch, inputs_length), jnp.int32)
    y = jnp.ones((batch, targets_length), jnp.int32)
    ours = sum(flops.t5_forward_flops(config, batch=batch, inputs_length=inputs_length,
                                      targets_length=targets_length).values())
    xla_forward = jax.jit(forward).lower(params, x, y).compile().cost_analysis()["flops"]
    assert ours <= xla_forward <= 1.01 * ours
    grad = jax.jit(jax.grad(lambda p, x, y: jnp.sum(forward(p, x, y))))
    xla_train = grad.lower(params, x, y).compile().cost_analysis()["flops"]
    assert abs(xla_train / (3 * ours) - 1) <= 0.01


def test_count_by_family_name(tiny_config):
    from t5x_like.config import resolve
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families import get_family

    vocabulary = get_vocabulary(None)
    family = get_family(resolve(tiny_config, vocabulary.vocab_size), vocabulary)
    count = flops.count(family, 8)
    assert count.forward == flops.t5_forward_flops(
        family.model_config, batch=8, inputs_length=32, targets_length=family.targets_length)
    assert count.training == 3 * sum(count.forward.values())
    assert count.tokens == 8 * (32 + family.targets_length)

    class Unknown:
        config = type("C", (), {"family": "perceiver"})()

    with pytest.raises(UserError, match="no FLOP count for family 'perceiver'"):
        flops.count(Unknown(), 8)
