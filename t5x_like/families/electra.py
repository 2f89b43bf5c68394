"""ELECTRA: replaced-token detection, a generator and a discriminator trained jointly.

Host rows are the encoder families' (``families/bert.py``; FULL-SENTENCES by default). In the
step, ``features`` selects 15% of the positions (``electra_masking``: 85% [MASK], 15% kept,
no random tokens); ``loss_fn`` runs the small generator (``generator_fraction`` of the
discriminator's width, same depth, shared embeddings: ``models.encoder.ElectraPair``) at the
selected slots, samples one token per slot from its softmax (Gumbel-max, stop-gradient:
``objectives.replaced_tokens``), and the discriminator labels every non-padding token of the
result as replaced (1) or original (0; a correct guess counts as original).

Loss = generator MLM (mean over the selected slots) + ``objective.disc_weight`` (50) x BCE
(mean over all non-padding tokens). As in ``bert.py`` the trainer divides by the MLM weight, so
each row carries ``disc_scale`` = (MLM weight) / (non-padding tokens) of the whole batch, made
in ``features`` before any micro-batching. Only the discriminator is the model to keep; the
export writes both (``discriminator/`` and ``generator/``, interop/hf_encoder.py).

Metrics: ``accuracy`` / ``cross_entropy`` (generator MLM), ``disc/accuracy``,
``disc/cross_entropy`` (BCE), ``disc/replaced`` (share of tokens replaced). In evaluation the
discriminator's scores are also histogrammed per label (``objective.auc_bins`` bins of
sigmoid(logit)) and summed like every metric; ``summarize`` turns the totals into
``disc/auc``, exact up to ties inside a bin (counted half).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like import losses
from t5x_like.errors import UserError
from t5x_like.errors import check as _check
from t5x_like.families.base import summarize
from t5x_like.families.bert import EncoderFamily
from t5x_like.models.encoder import ElectraPair, EncoderConfig
from t5x_like.objectives.replaced_tokens import sample_replacements

_HISTOGRAMS = ("disc/scores_replaced", "disc/scores_original")


def auc_from_histograms(replaced: np.ndarray, original: np.ndarray) -> float:
    """P(score of a replaced token > score of an original one), ties counted half, from
    per-label histograms over the same ascending bins (NaN without both labels)."""
    replaced, original = np.asarray(replaced, np.float64), np.asarray(original, np.float64)
    pos, neg = replaced.sum(), original.sum()
    if pos == 0 or neg == 0:
        return float("nan")
    below = np.cumsum(original) - original  # originals in lower bins
    return float(np.sum(replaced * (below + 0.5 * original)) / (pos * neg))


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-element -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], stable for any x."""
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


class ElectraFamily(EncoderFamily):
    """ELECTRA (generator MLM + 50 x discriminator BCE, jointly)."""

    module_class: ClassVar[type] = ElectraPair
    config_class: ClassVar[type] = EncoderConfig
    objective_name: ClassVar[str] = "replaced_token_detection"

    # ------------------------------------------------------------------ schema
    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "model_type": "electra", "pooler": False,
                "nsp_head": False, "mlm_head": False, "discriminator_head": True}

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "layout": "full_sentences",
                "mask_fraction": 0.85, "random_fraction": 0.0, "disc_weight": 50.0,
                "sampling_temperature": 1.0, "auc_bins": 1000}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        o, m = c.objective, c.model
        _check(o.layout == "full_sentences", "ELECTRA trains on single segments: set "
               "objective.layout='full_sentences'")
        _check(m.discriminator_head and not m.mlm_head,
               "the ELECTRA discriminator needs model.discriminator_head=True and "
               "model.mlm_head=False (the generator has its own MLM head)")
        _check(o.disc_weight > 0, f"objective.disc_weight must be positive, got {o.disc_weight}")
        _check(o.sampling_temperature > 0,
               f"objective.sampling_temperature must be positive, got {o.sampling_temperature}")
        _check(o.auc_bins >= 2, f"objective.auc_bins must be >= 2, got {o.auc_bins}")
        super().validate_config(c)

    # ------------------------------------------------------------------ objective
    def features(self, batch: dict, key: jax.Array) -> dict:
        """Host rows -> the generator's input, the selected slots, the original ids and
        ``disc_scale`` (module docstring)."""
        out = self.masked(batch, key, self.masking)
        mask = batch["attention_mask"].astype(jnp.float32)
        scale = jnp.sum(out["position_weights"]) / jnp.maximum(jnp.sum(mask), 1.0)
        return {
            "input_ids": out["inputs"],
            "original_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
            "positions": out["positions"],
            "targets": out["position_targets"],
            "target_weights": out["position_weights"],
            "disc_scale": jnp.full((mask.shape[0],), scale),
        }

    def replace(self, generator_logits: jax.Array, batch: dict, key: jax.Array) -> dict:
        """The discriminator's input and labels: one generator sample per selected slot."""
        keys = jax.random.split(key, generator_logits.shape[0])
        temperature = self.config.objective.sampling_temperature
        return jax.vmap(lambda k, t, p, w, g: sample_replacements(k, t, p, w, g, temperature))(
            keys, batch["original_ids"], batch["positions"], batch["target_weights"],
            generator_logits)

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): generator MLM + disc_weight x discriminator BCE.

        ``key`` is split into (sampling, generator dropout, discriminator dropout)."""
        pair = self.model(params)
        k_sample, k_gen, k_disc = jax.random.split(key, 3)
        dropout = self._dropout(train)
        mask, types = batch["attention_mask"], batch["token_type_ids"]
        generated = pair.generator(batch["input_ids"], mask, types,
                                   masked_positions=batch["positions"], enable_dropout=dropout,
                                   rngs=nnx.Rngs(dropout=k_gen))
        loss = self.config.loss
        sums = losses.cross_entropy_with_z_loss(
            generated["mlm_logits"], batch["targets"], batch["target_weights"],
            z_loss=loss.z_loss, label_smoothing=loss.label_smoothing)
        replaced = self.replace(generated["mlm_logits"], batch, k_sample)
        logits = pair.discriminator(replaced["inputs"], mask, types, enable_dropout=dropout,
                                    rngs=nnx.Rngs(dropout=k_disc))["discriminator_logits"]
        weights = mask.astype(jnp.float32)
        labels = replaced["labels"] * weights
        bce = binary_cross_entropy(logits, labels)
        disc_weight = self.config.objective.disc_weight
        sums["loss"] = sums["loss"] + disc_weight * jnp.sum(
            bce * weights * batch["disc_scale"][:, None])
        sums["disc/cross_entropy"] = jnp.sum(bce * weights)
        sums["disc/correct"] = jnp.sum(((logits > 0) == (labels > 0)) * weights)
        sums["disc/replaced"] = jnp.sum(labels)
        sums["disc/weight"] = jnp.sum(weights)
        if not train:
            bins = self.config.objective.auc_bins
            which = jnp.clip((jax.nn.sigmoid(logits) * bins).astype(jnp.int32), 0, bins - 1)
            for name, is_label in zip(_HISTOGRAMS, (labels, (1.0 - labels) * weights),
                                      strict=True):
                sums[name] = jnp.zeros((bins,), jnp.float32).at[which.ravel()].add(
                    is_label.ravel())
        return sums["loss"], sums

    def summarize(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        """Means of the sums, with the score histograms (evaluation) turned into ``disc/auc``."""
        sums = dict(sums)
        histograms = [sums.pop(name, None) for name in _HISTOGRAMS]
        out = summarize(sums)
        if histograms[0] is not None:
            out["disc/auc"] = auc_from_histograms(*histograms)
        return out

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        raise UserError("an ELECTRA checkpoint scores tokens as original or replaced, it does "
                        "not generate text; use t5x-like eval (or export it with export-hf)")
