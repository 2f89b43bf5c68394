"""T5: span corruption on device -> encoder-decoder -> cross-entropy with z-loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
from t5x_like.models.t5 import T5, T5Config
from t5x_like.objectives import span_corruption, span_corruption_lengths


def shift_right(targets: jax.Array) -> jax.Array:
    """Decoder inputs: targets moved one step right behind the start token 0."""
    return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


class T5Family:
    """T5 v1.1 pretrained with span corruption (or trained on given inputs/targets)."""

    def __init__(self, config: ml_collections.ConfigDict, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size  # the vocabulary's own size: sentinels count down from it
        self.model_config = T5Config.from_dict(config.model.to_dict())
        self.raw_length, self.targets_length = span_corruption_lengths(
            config.data.inputs_length,
            config.objective.noise_density,
            config.objective.mean_noise_span_length,
        )
        abstract = nnx.eval_shape(lambda: T5(self.model_config, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        """Fresh parameters as a pure dict (call under jax.jit with out_shardings)."""
        model = T5(self.model_config, rngs=nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def model(self, params: dict) -> T5:
        return nnx.merge(self.graphdef, params)

    # ------------------------------------------------------------------ objective
    def features(self, batch: dict, key: jax.Array) -> dict:
        """Raw chunks (``tokens``) are span-corrupted here, on device; ready pairs pass through."""
        if "tokens" not in batch:
            return batch
        objective = self.config.objective
        return span_corruption(
            key,
            batch["tokens"],
            vocab_size=self.vocab_size,
            noise_density=objective.noise_density,
            mean_noise_span_length=objective.mean_noise_span_length,
        )

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics); the caller divides by ``metrics['weight']``."""
        noise_key, dropout_key = jax.random.split(key)
        features = self.features(batch, noise_key)
        targets = features["targets"]
        logits = self.model(params)(
            features["inputs"],
            shift_right(targets),
            enable_dropout=train and self.model_config.dropout_rate > 0,
            rngs=nnx.Rngs(dropout=dropout_key),
        )
        sums = losses.cross_entropy_with_z_loss(
            logits,
            targets,
            targets > 0,
            z_loss=self.config.loss.z_loss,
            label_smoothing=self.config.loss.label_smoothing,
        )
        return sums["loss"], sums

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        """Log-likelihood of each example's targets (sum over its tokens)."""
        targets = features["targets"]
        logits = self.model(params)(features["inputs"], shift_right(targets))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token * (targets > 0), axis=-1)

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        """Greedy decoding with the KV cache."""
        return decoding.greedy_decode(self.model(params), features["inputs"], max_length=max_length)

    @functools.cached_property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(self.abstract_params)))
