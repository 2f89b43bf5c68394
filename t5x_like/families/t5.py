"""T5: span corruption on device -> encoder-decoder -> cross-entropy with z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
from t5x_like.errors import check
from t5x_like.families.base import Family
from t5x_like.models.t5 import T5, T5Config
from t5x_like.objectives import span_corruption, span_corruption_lengths

_POSITIVE = ("d_model", "d_kv", "num_heads", "d_ff", "num_encoder_layers", "num_decoder_layers",
             "relative_attention_num_buckets", "relative_attention_max_distance")


def shift_right(targets: jax.Array) -> jax.Array:
    """Decoder inputs: targets moved one step right behind the start token 0."""
    return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]



class T5Family(Family):
    """T5 v1.1 pretrained with span corruption (or trained on given inputs/targets)."""

    module_class = T5
    config_class = T5Config

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        self._raw_length, self.targets_length = span_corruption_lengths(
            config.data.inputs_length,
            config.objective.noise_density,
            config.objective.mean_noise_span_length,
        )

    # ------------------------------------------------------------------ schema
    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="span_corruption", noise_density=0.15, mean_noise_span_length=3.0)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        for name in _POSITIVE:
            check(m[name] > 0, f"config field model.{name} must be positive, got {m[name]}")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        check(0.0 <= m.dropout_rate < 1.0,
               f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
        check(o.name == "span_corruption", f"objective.name {o.name!r} is not 'span_corruption'")
        check(0.0 < o.noise_density < 1.0,
               f"objective.noise_density must be in (0, 1), got {o.noise_density}")
        check(o.mean_noise_span_length >= 1.0,
               f"objective.mean_noise_span_length must be >= 1, got {o.mean_noise_span_length}")
        super().validate_config(c)  # the module's own choices (dtype, remat, feed-forward)

    @property
    def raw_length(self) -> int:
        return self._raw_length

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
        targets = batch["targets"]
        logits = self.model(params)(
            batch["inputs"],
            shift_right(targets),
            enable_dropout=train and self.model_config.dropout_rate > 0,
            rngs=nnx.Rngs(dropout=key),
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

    def predict_batch(self, params: dict, features: dict, *, max_length: int,
                      options: decoding.Options | None = None,
                      key: jax.Array | None = None) -> jax.Array:
        """Tokens [B * num_return_sequences, max_length] decoded with the KV cache: greedy by
        default, beam search or sampling (needs ``key``) by ``options``."""
        return decoding.generate(self.model(params), features["inputs"], max_length=max_length,
                                 eos_id=1, options=options or decoding.Options(), key=key)
