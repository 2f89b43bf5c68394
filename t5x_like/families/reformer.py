"""Reformer: next-token LM (GPT's objective and data) on LSH attention with reversible layers.

Everything but the model is the GPT family's (``families/gpt.py``): packed chunks of
``inputs_length + 1`` tokens, inputs / targets shifted by one, sliding-window perplexity through
``score_batch``. The model is ``models/reformer.py`` (causal LSH attention, reversible layers,
chunked feed-forward). Training draws fresh LSH rotations every step from the step key, as the
paper hashes anew each time; scoring uses the rotations of ``model.hash_seed``, so an evaluation
is repeatable. Attention crosses document boundaries (``objective.document_mask`` must be
False: LSH buckets are formed over the whole row), and generation is not implemented.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from t5x_like.errors import UserError, check
from t5x_like.families.gpt import GPTFamily
from t5x_like.models.reformer import Reformer, ReformerConfig

HASH_SALT = 0x4A5E  # folded into the step key for the rotations


class ReformerFamily(GPTFamily):
    """Causal LM on a Reformer."""

    module_class = Reformer
    config_class = ReformerConfig

    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="causal_lm", document_mask=False)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(o.name == "causal_lm", f"objective.name {o.name!r} is not 'causal_lm'")
        check(not o.document_mask, "objective.document_mask=True is not available for the "
              "Reformer (LSH buckets span the whole row); set it to False")
        check(m.causal, "model.causal=False would let a language model see its targets")
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        check(c.data.inputs_length <= m.max_position_embeddings,
              f"data.inputs_length={c.data.inputs_length} exceeds model.max_position_embeddings="
              f"{m.max_position_embeddings}")
        ReformerConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    def _logits(self, params: dict, features: dict, *, train: bool, key: jax.Array | None):
        c = self.model_config
        hash_key = None if key is None else jax.random.fold_in(key, HASH_SALT)
        return self.model(params)(
            features["inputs"], features["inputs"] != self.pad_id, hash_key=hash_key,
            enable_dropout=train and max(c.hidden_dropout_rate, c.attention_dropout_rate) > 0,
            rngs=nnx.Rngs(dropout=key) if key is not None else None)["logits"]

    def predict_batch(self, params: dict, features: dict, *, max_length: int, **_) -> jax.Array:
        raise UserError("a Reformer checkpoint is scored with t5x-like eval (loss and "
                        "perplexity); generation is not implemented for it")
