"""UniLM: one shared Transformer, four language-modelling objectives chosen by attention masks.

The module is the decoder LM (``models/decoder_lm.py``) with its causal mask replaced by a
per-example ``attention_mask`` [B, L, L]. Each row of a batch draws its mode independently
(``objective``: 1/3 bidirectional, 1/3 seq2seq, 1/6 left-to-right, 1/6 right-to-left by
default) and is corrupted BERT-style (15% of the tokens, 80% <mask> / 10% random / 10% kept);
the loss is cross-entropy on the selected positions only, predicted from what the mode's mask
lets each position see (``objectives.unilm``).

Segments for seq2seq: a raw chunk has no sentence pairs, so each row is cut at a uniformly
random point between ``objective.source_min`` and ``source_max`` of its length; the part
before is the (bidirectional) source, the part after the (causal) target. Other modes ignore
the cut. There are no segment embeddings: the mask alone tells the model which mode it is in
(UniLM adds BERT's token-type embeddings; the decoder LM has none). The corruption is
``masking.mask`` with ``unilm_masking`` (BERT's recipe; never special tokens, random
replacements from the vocabulary's ordinary range). Metrics are reported per mode
(``bidirectional/accuracy`` ...) beside the total.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import UserError, check
from t5x_like.families.base import Family
from t5x_like.models.decoder_lm import DecoderLM, DecoderLMConfig
from t5x_like.objectives.denoising import below
from t5x_like.objectives.unilm import (
    MODE_NAMES,
    MODE_PROBS,
    seq2seq_mask,
    unilm_example,
    unilm_masking,
)


def source_segments(key: jax.Array, tokens: jax.Array, pad_id: int, low: float,
                    high: float) -> jax.Array:
    """[B, L] segment ids: 0 before a per-row cut drawn uniformly from
    ``[ceil(low * n), floor(high * n)]`` (n = the row's non-pad length, at least 1), 1 after."""
    n = jnp.sum(tokens != pad_id, axis=1)
    first = jnp.maximum(jnp.ceil(low * n).astype(jnp.int32), 1)
    last = jnp.maximum(jnp.floor(high * n).astype(jnp.int32), first)
    bits = jax.random.bits(key, (tokens.shape[0],), jnp.uint32)
    cut = first + below(bits, last - first + 1)
    return (jnp.arange(tokens.shape[1])[None] >= cut[:, None]).astype(jnp.int32)


class UniLMFamily(Family):
    """Unified LM pretraining (bidirectional, seq2seq, left-to-right, right-to-left)."""

    module_class = DecoderLM
    config_class = DecoderLMConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        ids = special_tokens(vocabulary)
        self.pad_id, self.eos_id, self.mask_id = ids.pad, ids.eos, ids.mask
        rate = config.objective.mlm_rate
        self.masking = unilm_masking(
            self.vocab_size, ids.mask, ids.all,
            max_predictions=max(1, math.ceil(rate * config.data.inputs_length)),
            rate=rate, random_range=ids.ordinary)

    # ------------------------------------------------------------------ schema
    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "vocab_size": 0, "activation": "gelu"}

    @classmethod
    def objective_defaults(cls) -> dict:
        probs = dict(zip(MODE_NAMES, MODE_PROBS, strict=True))
        return dict(name="unilm", mlm_rate=0.15, source_min=0.25, source_max=0.75, **probs)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(o.name == "unilm", f"objective.name {o.name!r} is not 'unilm'")
        probs = [o[name] for name in MODE_NAMES]
        check(min(probs) >= 0 and abs(sum(probs) - 1.0) < 1e-6,
               f"objective.{'/'.join(MODE_NAMES)} are the mode probabilities: non-negative, "
               f"summing to 1, got {probs}")
        check(0.0 < o.mlm_rate < 1.0, f"objective.mlm_rate must lie in (0, 1), got {o.mlm_rate}")
        check(0.0 < o.source_min <= o.source_max < 1.0,
               f"objective.source_min/source_max must satisfy 0 < min <= max < 1, got "
               f"{o.source_min} and {o.source_max}")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        if m.position_embedding == "learned":
            check(c.data.inputs_length <= m.max_length,
                   f"data.inputs_length={c.data.inputs_length} exceeds model.max_length="
                   f"{m.max_length} (the learned position table)")
        DecoderLMConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    # ------------------------------------------------------------------ objective
    def features(self, batch: dict, key: jax.Array) -> dict:
        """Raw chunks -> corrupted ``inputs``, ``targets``, ``target_weights`` (selected
        positions), the per-row ``attention_mask`` [B, L, L] and ``mode``."""
        o = self.config.objective
        tokens = batch["tokens"]
        k_cut, k_rows = jax.random.split(key)
        segments = source_segments(k_cut, tokens, self.pad_id, o.source_min, o.source_max)
        row = functools.partial(unilm_example, masking=self.masking,
                                mode_probs=tuple(o[name] for name in MODE_NAMES))
        keys = jax.random.split(k_rows, tokens.shape[0])
        out = jax.vmap(row)(keys, tokens, segments)
        return {"inputs": out["inputs"], "targets": out["targets"],
                "target_weights": out["weights"], "attention_mask": out["attention_mask"],
                "mode": out["mode"]}

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): masked-token CE, also broken down by mode."""
        c = self.model_config
        logits = self.model(params)(
            batch["inputs"], attention_mask=batch["attention_mask"],
            enable_dropout=train and max(c.dropout_rate, c.attention_dropout_rate) > 0,
            rngs=nnx.Rngs(dropout=key))
        weights = batch["target_weights"]
        ce = functools.partial(losses.cross_entropy_with_z_loss, logits, batch["targets"],
                               z_loss=self.config.loss.z_loss,
                               label_smoothing=self.config.loss.label_smoothing)
        sums = ce(weights)
        for index, name in enumerate(MODE_NAMES):
            part = ce(weights * (batch["mode"] == index)[:, None])
            for metric in ("cross_entropy", "correct", "weight"):
                sums[f"{name}/{metric}"] = part[metric]
        return sums["loss"], sums

    def predict_batch(self, params: dict, features: dict, *, max_length: int,
                      options: decoding.Options | None = None,
                      key: jax.Array | None = None) -> jax.Array:
        """Seq2seq-mode continuations [B * num_return_sequences, max_length] of the sources
        ``features['inputs']`` (padded with 0): greedy by default, beam search or sampling
        (needs ``key``) by ``options``; a row stops at its EOS (kept), zeros after.

        As UniLM decodes: each step appends <mask> behind the source (bidirectional) and the
        target so far (causal) and predicts it, as masked tokens are in training. A source's
        keys see the whole source and a target's only what precedes it, so a KV cache holds
        them (``seq2seq_stepper``). A source's trailing EOS (``infer`` ends every input with
        one) is dropped and one EOS is put in front, as a document starts after an EOS in
        the training stream.
        """
        options = options or decoding.Options()
        if options.sampling and key is None:
            raise UserError("sampling (temperature > 0) needs a random key (--seed)")
        sources = jnp.asarray(features["inputs"], jnp.int32)
        valid = sources != self.pad_id
        last = jnp.sum(valid, axis=1) - 1
        final_eos = (jnp.arange(sources.shape[1])[None] == last[:, None]) & (
            sources == self.eos_id)
        sources = jnp.where(final_eos, self.pad_id, sources)
        sources = jnp.pad(sources, ((0, 0), (1, 0)), constant_values=self.eos_id)
        c = self.model_config
        if c.position_embedding == "learned" and sources.shape[1] + max_length > c.max_length:
            raise UserError(f"a source of {sources.shape[1]} tokens plus {max_length} new ones "
                            f"exceeds model.max_length={c.max_length}; shorten the input or "
                            "--max-length")
        graphdef, state = nnx.split(self.model(params))
        return _generate(graphdef, state, sources, sources != self.pad_id,
                         jax.random.key(0) if key is None else key, options=options,
                         max_length=max_length, ids=(self.eos_id, self.pad_id, self.mask_id))


def seq2seq_stepper(model: DecoderLM, sources: jax.Array, valid: jax.Array, *, max_length: int,
                    mask_id: int, repeat: int = 1) -> decoding.Stepper:
    """UniLM's seq2seq decoding as a ``decoding.Stepper`` over a KV cache.

    Slots are ``[sources [B, S] | max_length generated]``; positions count a row's real source
    tokens, so padding inside the source changes nothing. Target i is predicted at slot
    S + i from a <mask> there, which sees the source and the targets before it. The source
    sees only itself (bidirectionally) and a target only what precedes it, so their keys and
    values never change once the <mask> before a target is replaced by the token: a cache
    holds them. The first pass (here, once) runs the source and the first <mask>; step i >= 1
    runs token i - 1 at slot S + i - 1 (its keys and values go in over its <mask>'s) and the
    <mask> at S + i. Equal to recomputing the whole sequence each step.
    """
    sources = jnp.repeat(sources, repeat, axis=0)
    valid = jnp.repeat(valid, repeat, axis=0)
    rows, width = sources.shape
    counts = jnp.sum(valid, axis=1, keepdims=True)
    source_positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    cache = model.init_cache(rows, width + max_length)
    first_logits, cache = _first_pass(
        model, jnp.pad(sources, ((0, 0), (0, 1)), constant_values=mask_id),
        jnp.pad(valid, ((0, 0), (0, 1)), constant_values=True),
        jnp.concatenate([source_positions, counts], axis=1).astype(jnp.int32), cache)

    def step(previous, cache, position):
        def later(cache):
            tokens = jnp.stack([previous, jnp.full_like(previous, mask_id)], axis=1)
            target = position - width  # the <mask>'s index among the targets
            positions = (counts + jnp.stack([target - 1, target])[None]).astype(jnp.int32)
            hidden, cache = model.extend(tokens, cache, position - 1,
                                         valid=jnp.ones((rows, 2), bool), positions=positions)
            return model.logits(hidden[:, 1:])[:, 0], cache

        return jax.lax.cond(position == width, lambda c: (first_logits, c), later, cache)

    return decoding.Stepper(step, cache, {"key": 1, "value": 1},
                            jnp.full((rows,), mask_id, jnp.int32), width)


def _first_pass(model: DecoderLM, ids: jax.Array, valid: jax.Array, positions: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
    """Logits [N, vocab] at the last slot of ``ids`` (the first <mask>) and the cache holding
    every slot's keys and values: ``DecoderLM.extend`` at slot 0 with the seq2seq mask
    (a bidirectional source) in place of its causal one."""
    length, slots = ids.shape[1], cache["key"].shape[2]
    is_source = jnp.arange(length)[None] < length - 1
    mask = jax.vmap(seq2seq_mask)(valid, is_source & valid)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, slots - length)))
    hidden, cache = model.extend(ids, cache, 0, valid=valid, positions=positions,
                                 attention_mask=mask)
    return model.logits(hidden[:, -1:])[:, 0], cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("options", "max_length", "ids"))
def _generate(graphdef, state, sources, valid, key, *, options: decoding.Options,
              max_length: int, ids: tuple[int, int, int]) -> jax.Array:
    eos_id, pad_id, mask_id = ids
    model = nnx.merge(graphdef, state)
    repeat = options.beam_size if options.beam_size > 1 else options.num_return_sequences
    s = seq2seq_stepper(model, sources, valid, max_length=max_length, mask_id=mask_id,
                        repeat=repeat)
    return decoding.search(s, options, key, batch_size=sources.shape[0], max_length=max_length,
                           eos_id=eos_id, pad_id=pad_id)
