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
        ``features['inputs']`` (padded with 0): greedy, beam search or sampling by ``options``,
        computed as transformers' XLNet generates, with its memory (``generate`` below).
        A prompt's trailing EOS is dropped and one EOS put in front, as for GPT.
        """
        prompts = jnp.asarray(features["inputs"], jnp.int32)
        valid = prompts != self.pad_id
        last = jnp.sum(valid, axis=1) - 1
        final_eos = (jnp.arange(prompts.shape[1])[None] == last[:, None]) & (
            prompts == self.eos_id)
        prompts = jnp.where(final_eos, self.pad_id, prompts)
        prompts = jnp.pad(prompts, ((0, 0), (1, 0)), constant_values=self.eos_id)
        return generate(self.model(params), prompts, max_length=max_length, eos_id=self.eos_id,
                        options=options, key=key, pad_id=self.pad_id)


def generate(model: XLNet, prompts: jax.Array, *, max_length: int, eos_id: int,
             options: decoding.Options | None = None, key: jax.Array | None = None,
             pad_id: int = 0, valid: jax.Array | None = None) -> jax.Array:
    """Tokens [B * R, max_length] after prompts [B, T] (``valid``, default ``!= pad_id``, marks
    real tokens; each row needs one): greedy, beam search or sampling, as ``decoding.generate``
    returns them. Greedy equals ``transformers.XLNetLMHeadModel.generate`` on the same weights
    token for token (``left_to_right_stepper`` says how); a padded row decodes as it would alone.
    """
    options = options or decoding.Options()
    if options.sampling and key is None:
        raise UserError("sampling (temperature > 0) needs a random key (--seed)")
    if model.config.reuse_len:
        raise UserError(f"XLNet generation caches every state; the model has reuse_len="
                        f"{model.config.reuse_len}, set it to 0")
    prompts = jnp.asarray(prompts, jnp.int32)
    valid = prompts != pad_id if valid is None else jnp.asarray(valid, bool)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompts, valid,
                     jax.random.key(0) if key is None else key, options=options,
                     max_length=max_length, ids=(eos_id, pad_id))


def memory_slots(config: XLNetConfig, prompt_width: int, max_length: int) -> int:
    """Memory slots a decode step attends to: all earlier tokens but the two it recomputes
    (``prompt_width - 1 + max_length - 2`` at most), or ``mem_len - 2`` if that is fewer, as
    transformers' ``mems[:-2]`` of a memory cut to ``mem_len``."""
    slots = prompt_width - 1 + max(max_length - 2, 0)
    if config.mem_len:
        slots = min(slots, config.mem_len - 2)
    return max(slots, 0)


def left_to_right_stepper(model: XLNet, prompts: jax.Array, valid: jax.Array, *,
                          max_length: int, pad_id: int, repeat: int = 1) -> decoding.Stepper:
    """XLNet's left-to-right decoding with its memory, as transformers' ``generate`` computes
    it, as a ``decoding.Stepper`` of fixed shapes (one compile, however long the output).

    transformers' ``prepare_inputs_for_generation`` appends a dummy token that no position
    sees (``perm_mask[:, :, -1] = 1``) and predicts it with the query stream (the dummy is
    the only target); every other pair of positions sees each other. The first pass runs on
    [prompt; dummy], the prompt attending both ways. Each later pass runs on the last two
    tokens and a dummy, with the memory (``use_mems``: each layer's input states) of all tokens
    before those two: the last token is new, the one before it is recomputed now that it
    can see the newest token, and its state joins the memory. That recomputation, not a
    plain one-token step, is what equality with transformers needs, so it is reproduced.

    Here the memory is a buffer of ``memory_slots`` per layer, right-aligned (its last slot
    is the token just before the two a pass runs on, so relative distances are those of
    transformers' contiguous memory) with a mask of filled slots; a pass shifts it one slot.
    Prompt padding is moved to the left and masked, in the prompt pass and in the memory, so
    a padded row decodes as it would alone (transformers' XLNet ignores ``attention_mask`` in
    generation and would attend the padding). The dummy is ``pad_id`` (transformers': 0); no
    position sees it, so its id changes nothing. The prompt pass runs here, once; the
    stepper's first step returns its logits, later steps run the three-token pass.
    """
    order = jnp.argsort(valid, axis=1, stable=True)  # padding first, real tokens in order
    prompts = jnp.repeat(jnp.take_along_axis(prompts, order, axis=1), repeat, axis=0)
    valid = jnp.repeat(jnp.take_along_axis(valid, order, axis=1), repeat, axis=0)
    rows, width = prompts.shape
    slots = memory_slots(model.config, width, max_length)

    def dummy_pass(tokens, attention_mask, **memory):
        length = tokens.shape[1] + 1
        unseen = jnp.zeros((rows, length, length), jnp.float32).at[:, :, -1].set(1.0)
        target = jnp.zeros((rows, 1, length), jnp.float32).at[:, 0, -1].set(1.0)
        out = model(jnp.pad(tokens, ((0, 0), (0, 1)), constant_values=pad_id),
                    perm_mask=unseen, target_mapping=target,
                    attention_mask=jnp.pad(attention_mask, ((0, 0), (0, 1)), constant_values=1),
                    **memory)
        return out.logits[:, 0], out.mems

    first_logits, mems = dummy_pass(prompts, valid.astype(jnp.float32), mem_len=width + 1)
    mems, mem_valid = mems[:, :, : width - 1], valid[:, : width - 1]  # all but the last token
    fill = max(slots - (width - 1), 0)
    mems = jnp.pad(mems, ((0, 0), (0, 0), (fill, 0), (0, 0)))[:, :, mems.shape[2] + fill - slots:]
    mem_valid = jnp.pad(mem_valid, ((0, 0), (fill, 0)))[:, mem_valid.shape[1] + fill - slots:]

    def step(previous, cache, position):
        def later(cache):
            tokens = jnp.stack([cache["last"], previous], axis=1)
            logits, new = dummy_pass(tokens, jnp.ones((rows, 2), jnp.float32),
                                     mems=jnp.swapaxes(cache["mems"], 0, 1),
                                     mem_mask=cache["mem_valid"], mem_len=slots + 3)
            new = jnp.swapaxes(new[:, :, 1: slots + 1], 0, 1)  # [the oldest out; the first in]
            mask = cache["mem_valid"]
            if slots:
                mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)), constant_values=True)
            return logits, new.astype(cache["mems"].dtype), mask

        logits, new_mems, mask = jax.lax.cond(
            position == 0, lambda c: (first_logits, c["mems"], c["mem_valid"]), later, cache)
        return logits, {"mems": new_mems, "mem_valid": mask, "last": previous}

    cache = {"mems": jnp.swapaxes(mems, 0, 1), "mem_valid": mem_valid,
             "last": prompts[:, -1]}
    return decoding.Stepper(step, cache, {"mems": 0, "last": 0}, prompts[:, -1], 0)


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
