"""GPT-style LM: next-token cross-entropy on packed chunks -> decoder-only Transformer.

The host stream is documents joined by EOS (id 1) and cut into chunks of ``inputs_length + 1``
tokens; the model reads the first ``inputs_length`` and predicts each next token. With
``objective.document_mask`` (the default) each EOS *starts* a document segment, the way a BOS
would: a token attends only within its segment, positions restart there, and the EOS position
predicts the next document's first token from nothing before it (GPT-2's ``<|endoftext|>``
role, without attention across documents). No loss is masked: every prediction is one the
model can make from what it sees. With ``document_mask=False`` attention runs across the whole
chunk, as GPT-2 trained.

Evaluation adds sliding-window perplexity (``evaluation/perplexity.py``) through
``score_batch``: the same features, so a window is scored exactly as training chunks are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import UserError, check
from t5x_like.families.base import Family
from t5x_like.models.decoder_lm import DecoderLM, DecoderLMConfig

EOS_ID = 1  # T5-style vocabularies: documents in the stream end with EOS



def document_segments(tokens: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
    """[B, L] segment ids: 1 + the number of EOS at or before each position (an EOS opens the
    next document), 0 on padding."""
    segments = 1 + jnp.cumsum(tokens == eos_id, axis=1, dtype=jnp.int32)
    return jnp.where(tokens == pad_id, 0, segments)


class GPTFamily(Family):
    """Decoder-only causal LM (GPT-2 by default; rotary / RMSNorm / SwiGLU by config)."""

    module_class = DecoderLM
    config_class = DecoderLMConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        ids = special_tokens(vocabulary)
        self.eos_id, self.pad_id = ids.eos, ids.pad

    # ------------------------------------------------------------------ schema
    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="causal_lm", document_mask=True)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(o.name == "causal_lm", f"objective.name {o.name!r} is not 'causal_lm'")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        if m.position_embedding == "learned":
            check(c.data.inputs_length <= m.max_length,
                   f"data.inputs_length={c.data.inputs_length} exceeds model.max_length="
                   f"{m.max_length} (the learned position table); raise max_length or use "
                   "model.position_embedding='rotary'")
        if m.vocab_size == 0:  # the module checks sizes; 0 only means "derive it"
            m = ml_collections.ConfigDict({**m.to_dict(), "vocab_size": 1})
        DecoderLMConfig.from_dict(m.to_dict())

    @property
    def raw_length(self) -> int:
        return self.config.data.inputs_length + 1

    @property
    def perplexity_window(self) -> int:
        """Tokens per perplexity window by default: one training chunk (the first token of a
        window is context only, so the model reads ``inputs_length`` tokens of it)."""
        return self.raw_length

    # ------------------------------------------------------------------ objective
    def features(self, batch: dict, key: jax.Array) -> dict:
        """Chunks of ``L + 1`` tokens -> inputs / targets of ``L`` (+ segments); no randomness.

        ``batch['weights']`` (perplexity windows), when given, says which targets to score:
        its entry for token t+1 is the weight of predicting it from position t.
        """
        del key
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        weights = batch["weights"][:, 1:] if "weights" in batch else targets != self.pad_id
        out = {"inputs": inputs, "targets": targets, "target_weights": weights}
        if self.config.objective.document_mask:
            out["segment_ids"] = document_segments(inputs, self.eos_id, self.pad_id)
        return out

    # ------------------------------------------------------------------ contract
    def _logits(self, params: dict, features: dict, *, train: bool, key: jax.Array | None):
        c = self.model_config
        return self.model(params)(
            features["inputs"],
            segment_ids=features.get("segment_ids"),
            enable_dropout=train and max(c.dropout_rate, c.attention_dropout_rate) > 0,
            rngs=nnx.Rngs(dropout=key) if key is not None else None,
        )

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics) of next-token prediction."""
        logits = self._logits(params, batch, train=train, key=key)
        sums = losses.cross_entropy_with_z_loss(
            logits,
            batch["targets"],
            batch["target_weights"],
            z_loss=self.config.loss.z_loss,
            label_smoothing=self.config.loss.label_smoothing,
        )
        return sums["loss"], sums

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        """Summed log-likelihood per row [N] of ``{'tokens': [N, W], 'weights': [N, W]}``:
        ``weights[n, i]`` asks for log p(tokens[n, i] | tokens[n, :i])."""
        f = self.features(features, None)
        logits = self._logits(params, f, train=False, key=None)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        token = jnp.take_along_axis(logits, f["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum((token - log_z) * f["target_weights"], axis=-1)

    def predict_batch(self, params: dict, features: dict, *, max_length: int,
                      options: decoding.Options | None = None,
                      key: jax.Array | None = None) -> jax.Array:
        """Continuations [B * num_return_sequences, max_length] of prompts
        ``features['inputs']`` (padded with 0), with the KV cache: greedy by default, beam search
        or sampling (needs ``key``) by ``options``; a row stops at its EOS (kept), zeros after.

        A prompt's trailing EOS (``infer`` ends every input with one) is dropped and one EOS is
        put in front: an EOS starts a document in training, so the prompt is a document start.
        """
        prompts = jnp.asarray(features["inputs"], jnp.int32)
        valid = prompts != self.pad_id
        last = jnp.sum(valid, axis=1) - 1
        is_final_eos = (jnp.arange(prompts.shape[1])[None] == last[:, None]) & (
            prompts == self.eos_id)
        prompts = jnp.where(is_final_eos, self.pad_id, prompts)
        prompts = jnp.pad(prompts, ((0, 0), (1, 0)), constant_values=self.eos_id)
        c = self.model_config
        if c.position_embedding == "learned" and prompts.shape[1] + max_length > c.max_length:
            raise UserError(f"a prompt of {prompts.shape[1]} tokens plus {max_length} new ones "
                            f"exceeds model.max_length={c.max_length}; shorten the input or "
                            "--max-length")
        return decoding.generate(self.model(params), prompts, max_length=max_length,
                                 eos_id=self.eos_id, pad_id=self.pad_id,
                                 options=options or decoding.Options(), key=key)
