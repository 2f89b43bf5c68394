"""XLNet: permutation language modelling on device -> two-stream relative-attention Transformer.

Per row the objective (``objectives.permutation``) samples a factorisation order with about
1/K of the tokens (K = ``objective.k``, 6 by default) as targets at its end, single tokens or,
with ``objective.span``, the reference's n-gram spans; it builds the perm mask and the target
mapping there, in the jitted step. The query stream predicts the targets; the loss is
cross-entropy over them. EOS (the document separator of the packed stream) takes part in the
order as the reference's special tokens do and is never a target.

Recurrence, as in the reference (Transformer-XL's). With ``model.mem_len`` = M > 0 the
content stream's input to every layer is cached, under stop-gradient, as the next batch's
memory: the last M states of [memory; segment], from the step's own forward pass. The data
stream deals chunks so that row i of a batch continues row i of the previous batch for
``objective.consecutive_batches`` batches (``data.pipeline``), so the memory is the text that
really precedes the segment; once per that many batches a row moves to another place in the
stream, as it does at a document boundary. The memory is the family's carry
(``families.base``): part of the train state and of every checkpoint, so a resumed run is
bit-identical to one that never stopped. It starts at zeros, attended to as the reference's
first memory is; evaluation carries its own across its batches, from zeros. Raw chunks carry
no sentence pairs, so token-type ids are not used (the relative segment terms stay
untrained). ``model.reuse_len`` must be 0: the memory is the last M states.
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
from t5x_like.models import layers as L
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
        return dict(name="permutation_lm", k=6.0, span=False, max_span=5,
                    consecutive_batches=64)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(o.name == "permutation_lm", f"objective.name {o.name!r} is not 'permutation_lm'")
        check(1.0 <= o.k <= c.data.inputs_length,
               f"objective.k must lie in [1, data.inputs_length={c.data.inputs_length}] (about "
               f"1/k of the tokens are predicted), got {o.k}")
        check(o.max_span >= 1, f"objective.max_span must be >= 1, got {o.max_span}")
        check(o.consecutive_batches >= 1, "objective.consecutive_batches (how many batches a "
              f"row continues one text, for the memory) must be >= 1, got "
              f"{o.consecutive_batches}")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        check(m.reuse_len == 0, f"model.reuse_len={m.reuse_len}: the memory is the last "
               "mem_len states of the previous segment; set reuse_len to 0")
        XLNetConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    # ------------------------------------------------------------------ data, carry
    @property
    def consecutive_batches(self) -> int:
        """Rows continue their text across batches when there is a memory to carry."""
        return self.config.objective.consecutive_batches if self.model_config.mem_len else 1

    def initial_carry(self, batch_size: int) -> dict | None:
        """``{'mems': [B, layers, M, d_model]}`` zeros, batch first (sharded and split as the
        batch is), in the compute dtype the model caches in."""
        c = self.model_config
        if not c.mem_len:
            return None
        shape = (batch_size, c.num_layers, c.mem_len, c.d_model)
        return {"mems": jnp.zeros(shape, L.dtype_of(c.dtype))}

    # ------------------------------------------------------------------ objective
    def features(self, batch: dict, key: jax.Array) -> dict:
        """Raw chunks -> ``inputs`` [B, L] with their ``perm_mask`` [B, L, L],
        ``target_mapping`` [B, P, L], ``targets`` / ``target_weights`` [B, P]."""
        o = self.config.objective
        inputs = batch["tokens"]
        perm = permutation_lm(key, inputs, num_predict=num_predictions(inputs.shape[1], o.k),
                              k=o.k, special_ids=(self.eos_id,), pad_id=self.pad_id,
                              span=o.span, max_span=o.max_span)
        return {"inputs": inputs,
                **{name: perm[name] for name in ("perm_mask", "target_mapping", "targets",
                                                 "target_weights")}}

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): cross-entropy of the query stream at the targets;
        with a memory, ``sums['carry']`` is the next batch's."""
        model = self.model(params)
        carry = batch.get("carry")
        inputs = batch["inputs"]
        out = model(
            inputs,
            attention_mask=(inputs != self.pad_id).astype(jnp.float32),
            perm_mask=batch["perm_mask"],
            target_mapping=batch["target_mapping"],
            mems=None if carry is None else jnp.swapaxes(carry["mems"], 0, 1),
            enable_dropout=train and self.model_config.dropout_rate > 0,
            rngs=nnx.Rngs(dropout=key),
        )
        sums = losses.cross_entropy_with_z_loss(
            out.logits, batch["targets"], batch["target_weights"],
            z_loss=self.config.loss.z_loss, label_smoothing=self.config.loss.label_smoothing)
        if carry is not None:  # the model caches under stop-gradient
            sums["carry"] = {"mems": jnp.swapaxes(out.mems, 0, 1)}
        return sums["loss"], sums

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        raise UserError("an XLNet checkpoint is scored with t5x-like eval; generation is not "
                        "implemented for it")
