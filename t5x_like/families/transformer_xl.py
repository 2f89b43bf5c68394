"""Transformer-XL: next-token LM over continuing rows, with the segment memory carried.

The host stream deals chunks of ``inputs_length`` tokens so that row i of a batch continues
row i of the previous one for ``objective.consecutive_batches`` batches (``data.pipeline``,
as Transformer-XL's batchify lays out a corpus). The carry (``families/base.py``) holds each
row's memory (every layer's last ``mem_len`` input states, stop-gradient) and the last token of
its previous chunk, so a segment's inputs are that token then the chunk minus its last token,
and its targets are the chunk: every token of the stream is predicted once, with the memory as
context. The carry lives in the train state and checkpoints, so a resumed run is bit-identical.
Each row's first memory is zeros and its first "previous token" EOS (a document start), as in
the reference, whose first memory is zeros too; when a row moves to another place in the
stream (once per ``consecutive_batches``) its memory is stale for one segment, as XLNet's.

Evaluation: ``eval`` carries its own memory over its batches from zeros; sliding-window
perplexity (``score_batch``) runs each window as consecutive segments of ``inputs_length``
with the memory carried inside the window, so with the default window of four segments a token
sees up to ``mem_len`` + its segment of context (``evaluation/perplexity.py``).
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
from t5x_like.models.transformer_xl import TransformerXL, TransformerXLConfig

SEGMENTS_PER_WINDOW = 4  # default perplexity window: this many training segments (+1 token)


class TransformerXLFamily(Family):
    """Transformer-XL LM with segment-level recurrence."""

    module_class = TransformerXL
    config_class = TransformerXLConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        ids = special_tokens(vocabulary)
        self.pad_id, self.eos_id = ids.pad, ids.eos

    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="causal_lm", consecutive_batches=64)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(o.name == "causal_lm", f"objective.name {o.name!r} is not 'causal_lm'")
        check(o.consecutive_batches >= 1, "objective.consecutive_batches (how many batches a "
              f"row continues one text, for the memory) must be >= 1, got "
              f"{o.consecutive_batches}")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        TransformerXLConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    # ------------------------------------------------------------------ data, carry
    @property
    def consecutive_batches(self) -> int:
        return self.config.objective.consecutive_batches if self.model_config.mem_len else 1

    def initial_carry(self, batch_size: int) -> dict:
        """``mems`` [B, layers, M, d_model] zeros and ``last`` [B] EOS, batch first."""
        c = self.model_config
        carry = {"last": jnp.full((batch_size,), self.eos_id, jnp.int32)}
        if c.mem_len:
            carry["mems"] = jnp.zeros((batch_size, c.num_layers, c.mem_len, c.d_model),
                                      L.dtype_of(c.dtype))
        return carry

    @property
    def perplexity_window(self) -> int:
        return SEGMENTS_PER_WINDOW * self.config.data.inputs_length + 1

    def features(self, batch: dict, key: jax.Array) -> dict:
        del key
        return {"tokens": batch["tokens"]}

    # ------------------------------------------------------------------ contract
    def _run(self, params, inputs, mems, *, train: bool, key):
        c = self.model_config
        return self.model(params)(
            inputs, mems=mems,
            enable_dropout=train and max(c.dropout_rate, c.attention_dropout_rate) > 0,
            rngs=nnx.Rngs(dropout=key) if key is not None else None)

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics) of next-token prediction over the chunk; the next
        batch's carry in ``sums['carry']``."""
        tokens, carry = batch["tokens"], batch["carry"]
        inputs = jnp.concatenate([carry["last"][:, None], tokens[:, :-1]], axis=1)
        mems = jnp.swapaxes(carry["mems"], 0, 1) if "mems" in carry else None
        out = self._run(params, inputs, mems, train=train, key=key)
        sums = losses.cross_entropy_with_z_loss(
            out.logits, tokens, tokens != self.pad_id, z_loss=self.config.loss.z_loss,
            label_smoothing=self.config.loss.label_smoothing)
        sums["carry"] = {"last": tokens[:, -1]}
        if mems is not None:
            sums["carry"]["mems"] = jnp.swapaxes(out.mems, 0, 1)
        return sums["loss"], sums

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        """Summed log-likelihood per row [N] of ``{'tokens', 'weights'}`` windows [N, W]: the
        window is read as consecutive segments of ``inputs_length`` with the memory carried
        (zeros before the first), right-padded to whole segments (weight 0)."""
        tokens, weights = features["tokens"], features["weights"]
        seg = self.config.data.inputs_length
        pad = -(tokens.shape[1] - 1) % seg
        tokens = jnp.pad(tokens, ((0, 0), (0, pad)), constant_values=self.pad_id)
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
        n, count = tokens.shape[0], (tokens.shape[1] - 1) // seg

        def split(x):  # [N, count * seg] -> [count, N, seg]
            return jnp.swapaxes(x.reshape(n, count, seg), 0, 1)

        c = self.model_config
        mems = (jnp.zeros((c.num_layers, n, c.mem_len, c.d_model), L.dtype_of(c.dtype))
                if c.mem_len else None)

        def step(mems, xs):
            inputs, targets, w = xs
            out = self._run(params, inputs, mems, train=False, key=None)
            log_p = jax.nn.log_softmax(out.logits)
            token = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
            return out.mems, jnp.sum(token * w, axis=-1)

        _, per_segment = jax.lax.scan(step, mems, (split(tokens[:, :-1]), split(tokens[:, 1:]),
                                                   split(weights[:, 1:])))
        return jnp.sum(per_segment, axis=0)

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        raise UserError("a Transformer-XL checkpoint is scored with t5x-like eval (loss and "
                        "perplexity with its memory); generation is not implemented for it")
