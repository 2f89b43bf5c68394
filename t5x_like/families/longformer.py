"""Longformer: RoBERTa's dynamic-masking MLM on long FULL-SENTENCES rows, with windowed attention.

Everything but the model is RoBERTa's family (``families/bert.py``): rows ``<s> ... </s>`` packed
across documents, a fresh mask every step, the MLM head only at the selected slots. The model is
``models/longformer.py``: sliding-window attention, linear in the row length. As in the paper's
MLM pretraining no token is global; global attention ([CLS], question tokens) is for
fine-tuning and for the imported model's ``global_attention_mask``.
"""

from __future__ import annotations

import ml_collections

from t5x_like.data import sentence_pairs
from t5x_like.errors import check
from t5x_like.families.bert import RobertaFamily
from t5x_like.models.longformer import LongformerConfig, LongformerModel


class LongformerFamily(RobertaFamily):
    """RoBERTa's MLM objective on a Longformer encoder."""

    module_class = LongformerModel
    config_class = LongformerConfig

    @classmethod
    def model_defaults(cls) -> dict:
        return super(RobertaFamily, cls).model_defaults()  # LongformerConfig's own defaults

    @classmethod
    def _validate_model(cls, c: ml_collections.ConfigDict) -> None:
        m = c.model
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        check(m.mlm_head, "model.mlm_head=False leaves the MLM objective nothing to train")
        check(c.objective.layout == "full_sentences" and not c.objective.span_boundary_objective,
              "the Longformer trains on objective.layout='full_sentences' without a span-boundary "
              "objective (it has no NSP/SOP or SBO head)")
        check(c.data.inputs_length + m.position_offset <= m.max_position_embeddings,
              f"data.inputs_length={c.data.inputs_length} (+ position_offset "
              f"{m.position_offset}) exceeds model.max_position_embeddings="
              f"{m.max_position_embeddings}")
        LongformerConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    def _special(self) -> sentence_pairs.SpecialTokens:
        ids = self.ids  # RoBERTa's <s> ... </s>
        return sentence_pairs.SpecialTokens(pad=ids.pad, cls=ids.bos, sep=ids.eos, bos=ids.bos,
                                            eos=ids.eos)
