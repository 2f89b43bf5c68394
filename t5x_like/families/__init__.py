"""Families by name: where an objective, a module and a loss meet (T5X's BaseModel contract).

The trainer only ever calls a family's ``init``, ``features``, ``loss_fn``, ``score_batch``,
``predict_batch`` and ``batches``; adding a family is a new file here plus one line in
``FAMILIES``. Classes are imported on first use, so a run loads only its own model code.
"""

from __future__ import annotations

import importlib

import ml_collections

from t5x_like.errors import UserError

FAMILIES = {
    "t5": "t5x_like.families.t5:T5Family",
    "gpt": "t5x_like.families.gpt:GPTFamily",
    "bart": "t5x_like.families.bart:BartFamily",
    "mass": "t5x_like.families.bart:MassFamily",
    "unilm": "t5x_like.families.unilm:UniLMFamily",
    "xlnet": "t5x_like.families.xlnet:XLNetFamily",
    "distill": "t5x_like.families.distill:DistillFamily",
    "tinybert": "t5x_like.families.tinybert:TinyBertFamily",
    "tinybert_task": "t5x_like.families.tinybert_task:TinyBertTaskFamily",
    "mobilebert": "t5x_like.families.mobilebert:MobileBertFamily",
    "mobilebert_pkt": "t5x_like.families.mobilebert:MobileBertPKTFamily",
    "mobilebert_pd": "t5x_like.families.mobilebert:MobileBertPDFamily",
    "bert": "t5x_like.families.bert:EncoderFamily",
    "roberta": "t5x_like.families.bert:RobertaFamily",
    "albert": "t5x_like.families.bert:AlbertFamily",
    "spanbert": "t5x_like.families.bert:SpanBertFamily",
    "structbert": "t5x_like.families.bert:StructBertFamily",
    "ernie": "t5x_like.families.bert:ErnieFamily",
    "electra": "t5x_like.families.electra:ElectraFamily",
    "longformer": "t5x_like.families.longformer:LongformerFamily",
    "transformer_xl": "t5x_like.families.transformer_xl:TransformerXLFamily",
    "reformer": "t5x_like.families.reformer:ReformerFamily",
    "t5_finetune": "t5x_like.families.finetune:T5FinetuneFamily",
    "bart_finetune": "t5x_like.families.finetune:BartFinetuneFamily",
    "bert_finetune": "t5x_like.families.finetune:EncoderFinetuneFamily",
    "elmo": "t5x_like.families.elmo:ElmoFamily",
    "elmo_finetune": "t5x_like.families.elmo:ElmoFinetuneFamily",
    "audio_bert": "t5x_like.families.audio_bert:AudioBertFamily",
}


def family_class(name: str) -> type:
    if name not in FAMILIES:
        raise UserError(f"config field family={name!r} is not one of {sorted(FAMILIES)}")
    module, _, attr = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def get_family(config: ml_collections.ConfigDict, vocabulary):
    """The family object for a resolved config."""
    return family_class(config.family)(config, vocabulary)
