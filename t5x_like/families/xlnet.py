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

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
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

    def predict_batch(self, params: dict, features: dict, *, max_length: int,
                      options: decoding.Options | None = None,
                      key: jax.Array | None = None) -> jax.Array:
        """Left-to-right continuations [B * num_return_sequences, max_length] of prompts
        ``features['inputs']`` (padded with 0): greedy, beam search or sampling by ``options``.

        As transformers' XLNet generates: a dummy token is appended, no position sees its
        content, and the query stream predicts it. Here the factorisation order is the natural
        one (every position sees only those before it), one of the orders XLNet trains on, and
        the whole sequence is recomputed each step: no memory is used (the model's memory is
        always visible and starts at zeros, so a memory decode would not equal the forward).
        A prompt's trailing EOS is dropped and one EOS put in front, as for GPT.
        """
        options = options or decoding.Options()
        if options.sampling and key is None:
            raise UserError("sampling (temperature > 0) needs a random key (--seed)")
        prompts = jnp.asarray(features["inputs"], jnp.int32)
        valid = prompts != self.pad_id
        last = jnp.sum(valid, axis=1) - 1
        final_eos = (jnp.arange(prompts.shape[1])[None] == last[:, None]) & (
            prompts == self.eos_id)
        prompts = jnp.where(final_eos, self.pad_id, prompts)
        prompts = jnp.pad(prompts, ((0, 0), (1, 0)), constant_values=self.eos_id)
        graphdef, state = nnx.split(self.model(params))
        return _generate(graphdef, state, prompts, prompts != self.pad_id,
                         jax.random.key(0) if key is None else key, options=options,
                         max_length=max_length, ids=(self.eos_id, self.pad_id))


def left_to_right_stepper(model: XLNet, prompts: jax.Array, valid: jax.Array, *,
                          max_length: int, pad_id: int, repeat: int = 1) -> decoding.Stepper:
    """XLNet's natural-order decoding as a ``decoding.Stepper`` that recomputes the forward.

    Prompt padding is moved to the left and never attended (relative positions between real
    tokens are unchanged). Step at slot p writes the previous token at p - 1 (from the second
    step on), puts a dummy at p that no position sees, and returns the query stream's logits
    there. The cache is the token buffer (beam search permutes its rows).
    """
    order = jnp.argsort(valid, axis=1, stable=True)  # padding first, real tokens in order
    prompts = jnp.repeat(jnp.take_along_axis(prompts, order, axis=1), repeat, axis=0)
    valid = jnp.repeat(jnp.take_along_axis(valid, order, axis=1), repeat, axis=0)
    rows, width = prompts.shape
    slots = jnp.arange(width + max_length)
    later = slots[None, :] > slots[:, None]  # perm mask: i cannot see j > i
    tokens = jnp.concatenate([prompts, jnp.full((rows, max_length), pad_id, jnp.int32)], axis=1)
    is_prompt = jnp.concatenate([valid, jnp.zeros((rows, max_length), bool)], axis=1)

    def step(previous, cache, position):
        t = cache["tokens"]
        before = jnp.maximum(position - 1, width)  # = position on the first step: unchanged
        kept = jax.lax.dynamic_slice_in_dim(t, before, 1, axis=1)[:, 0]
        written = jnp.where(position > width, previous, kept)
        t = jax.lax.dynamic_update_slice(t, written[:, None].astype(jnp.int32), (0, before))
        seen = is_prompt | ((slots[None] >= width) & (slots[None] <= position))
        target = (slots == position).astype(jnp.float32)
        out = model(t, attention_mask=seen.astype(jnp.float32),
                    perm_mask=jnp.broadcast_to(later, (rows, *later.shape)).astype(jnp.float32),
                    target_mapping=jnp.broadcast_to(target, (rows, 1, slots.shape[0])))
        return out.logits[:, 0], {"tokens": t}

    return decoding.Stepper(step, {"tokens": tokens}, {"tokens": 0},
                            jnp.full((rows,), pad_id, jnp.int32), width)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("options", "max_length", "ids"))
def _generate(graphdef, state, prompts, valid, key, *, options: decoding.Options,
              max_length: int, ids: tuple[int, int]) -> jax.Array:
    eos_id, pad_id = ids
    model = nnx.merge(graphdef, state)
    repeat = options.beam_size if options.beam_size > 1 else options.num_return_sequences
    s = left_to_right_stepper(model, prompts, valid, max_length=max_length, pad_id=pad_id,
                              repeat=repeat)
    return decoding.search(s, options, key, batch_size=prompts.shape[0], max_length=max_length,
                           eos_id=eos_id, pad_id=pad_id)
