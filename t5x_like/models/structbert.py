"""StructBERT's encoder: BERT's (``EncoderModel``) with a 3-way sentence head on the pooled
[CLS] (next / previous / other-document segment, Wang et al., 2020) instead of NSP's 2-way one.

The parameters keep BERT's layout (``nsp/kernel`` is [H, 3]), so a StructBERT checkpoint
fine-tunes through ``bert_finetune`` like any encoder (fine-tuning drops the pretraining heads).
"""

from __future__ import annotations

from flax import nnx

from t5x_like.models.encoder import Dense, EncoderModel
from t5x_like.models.encoder_config import EncoderConfig

SENTENCE_CLASSES = 3


class StructBertModel(EncoderModel):
    """``EncoderModel`` whose ``nsp_logits`` are [B, 3]."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        if config.nsp_head:
            h = config.hidden_size
            self.nsp = Dense((h,), (SENTENCE_CLASSES,), ("mlp",), ("classes",), config, rngs=rngs)
