"""XLNet: permutation language modelling on device -> two-stream relative-attention Transformer.

Per row the objective (``objectives.permutation``) samples a factorisation order with about
1/K of the tokens (K = ``objective.k``, 6 by default) as targets at its end, single tokens or,
with ``objective.span``, the reference's n-gram spans; it builds the perm mask and the target
mapping there, in the jitted step. The query stream predicts the targets; the loss is
cross-entropy over them. EOS (the document separator of the packed stream) takes part in the
order as the reference's special tokens do and is never a target.

Recurrence. With ``model.mem_len`` = M > 0 each raw chunk holds M + ``inputs_length`` tokens
of one stretch of the stream: the first M are the previous segment, run once through the
content stream (no dropout, under stop-gradient) to give each layer's memory; the permutation
objective then trains on the remaining ``inputs_length`` tokens with that memory prepended to
keys and values. So every trained segment attends to a real, adjacent previous segment of the
same text, and the step stays a pure function of (params, batch, key): resuming is exact
without extra state. This is not the reference's cross-batch recurrence (its memory comes free
from the previous step's forward pass; here it costs one forward pass over M tokens), and the
memory segment's states come from a bidirectional pass rather than from that step's own
permutation. Raw chunks carry no sentence pairs, so token-type ids are not used (the relative
segment terms stay untrained). ``model.reuse_len`` must be 0: the memory is the last M states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import losses
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import UserError, check
from t5x_like.families.base import Family
from t5x_like.models.xlnet import XLNet, XLNetConfig
from t5x_like.objectives.permutation import num_predictions, permutation_lm


class XLNetFamily(Family):
    """XLNet pretrained with the permutation LM objective (two streams, relative attention)."""

    module_class = XLNet
    config_class = XLNetConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        ids = special_tokens(vocabulary)
        self.pad_id, self.eos_id = ids.pad, ids.eos

    # ------------------------------------------------------------------ schema
    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="permutation_lm", k=6.0, span=False, max_span=5)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(o.name == "permutation_lm", f"objective.name {o.name!r} is not 'permutation_lm'")
        check(1.0 <= o.k <= c.data.inputs_length,
               f"objective.k must lie in [1, data.inputs_length={c.data.inputs_length}] (about "
               f"1/k of the tokens are predicted), got {o.k}")
        check(o.max_span >= 1, f"objective.max_span must be >= 1, got {o.max_span}")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        check(m.reuse_len == 0, f"model.reuse_len={m.reuse_len}: the memory is the last "
               "mem_len states of the chunk's previous segment; set reuse_len to 0")
        XLNetConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    @property
    def raw_length(self) -> int:
        """The memory segment (``model.mem_len`` tokens) and the trained segment."""
        return self.model_config.mem_len + self.config.data.inputs_length

    # ------------------------------------------------------------------ objective
    def features(self, batch: dict, key: jax.Array) -> dict:
        """Raw chunks -> ``memory_tokens`` [B, M] (when M > 0), ``inputs`` [B, L] with their
        ``perm_mask`` [B, L, L], ``target_mapping`` [B, P, L], ``targets`` / ``target_weights``
        [B, P]."""
        o = self.config.objective
        tokens = batch["tokens"]
        memory = self.model_config.mem_len
        inputs = tokens[:, memory:]
        perm = permutation_lm(key, inputs, num_predict=num_predictions(inputs.shape[1], o.k),
                              k=o.k, special_ids=(self.eos_id,), pad_id=self.pad_id,
                              span=o.span, max_span=o.max_span)
        out = {"inputs": inputs,
               **{name: perm[name] for name in ("perm_mask", "target_mapping", "targets",
                                                "target_weights")}}
        if memory:
            out["memory_tokens"] = tokens[:, :memory]
        return out

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): cross-entropy of the query stream at the targets."""
        model = self.model(params)
        mems = None
        if "memory_tokens" in batch:
            previous = batch["memory_tokens"]
            mems = model(previous, attention_mask=(previous != self.pad_id).astype(jnp.float32)
                         ).mems  # stop-gradient inside the model
        inputs = batch["inputs"]
        out = model(
            inputs,
            attention_mask=(inputs != self.pad_id).astype(jnp.float32),
            perm_mask=batch["perm_mask"],
            target_mapping=batch["target_mapping"],
            mems=mems,
            enable_dropout=train and self.model_config.dropout_rate > 0,
            rngs=nnx.Rngs(dropout=key),
        )
        sums = losses.cross_entropy_with_z_loss(
            out.logits, batch["targets"], batch["target_weights"],
            z_loss=self.config.loss.z_loss, label_smoothing=self.config.loss.label_smoothing)
        return sums["loss"], sums

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        raise UserError("an XLNet checkpoint is scored with t5x-like eval; generation is not "
                        "implemented for it")
