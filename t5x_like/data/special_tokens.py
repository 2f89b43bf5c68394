"""The ids a family needs for its special tokens, whatever the vocabulary.

A Hugging Face tokenizer (``HFTokenizerVocabulary``) has its own [CLS]/[SEP]/[MASK]. Our
SentencePiece vocabularies follow T5 (pad 0, eos 1, unk 2, then pieces, then 100 sentinel
extra ids counting down from the top) and have no [CLS] or [MASK]: the encoder and denoising
families borrow the top sentinels for them, so one vocabulary serves every family and a
checkpoint never needs its embedding table resized.
"""

from __future__ import annotations

import dataclasses

from t5x_like.errors import UserError

# SentencePiece roles taken from the sentinels: <extra_id_0> is [MASK], and so on down.
_SENTINEL_ROLES = ("mask", "cls", "bos")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    pad: int
    eos: int
    unk: int
    cls: int
    sep: int
    mask: int
    bos: int
    ordinary: tuple[int, int]  # [low, high): ids of ordinary pieces (random-token replacement)

    @property
    def all(self) -> tuple[int, ...]:
        """Ids never selected for masking (padding included)."""
        return tuple(sorted({self.pad, self.eos, self.unk, self.cls, self.sep, self.mask,
                             self.bos}))


def special_tokens(vocabulary) -> SpecialTokens:
    """Special ids for ``vocabulary`` (an HF tokenizer adapter or a SentencePiece vocabulary)."""
    if hasattr(vocabulary, "cls_id"):  # HFTokenizerVocabulary
        if vocabulary.mask_id is None:
            raise UserError("the tokenizer has no mask token ([MASK] or <mask>); masked-LM "
                            "objectives need one")
        # Tokenizers put their specials first (BERT: 0-103, RoBERTa: 0-3), except a few
        # appended at the end (RoBERTa's <mask>), which the masking config excludes by id.
        head = [i for i in vocabulary.special_ids if i < vocabulary.vocab_size // 2]
        ordinary_low = max(head, default=-1) + 1
        return SpecialTokens(
            pad=vocabulary.pad_id, eos=vocabulary.eos_id, unk=vocabulary.unk_id,
            cls=vocabulary.cls_id, sep=vocabulary.sep_id, mask=vocabulary.mask_id,
            bos=vocabulary.bos_id, ordinary=(ordinary_low, vocabulary.vocab_size),
        )
    extra = getattr(vocabulary, "extra_ids", 0)
    if extra < len(_SENTINEL_ROLES):
        raise UserError(f"the vocabulary has {extra} extra ids; at least {len(_SENTINEL_ROLES)} "
                        "are needed for [MASK]/[CLS]/<s> (default vocabularies have 100)")
    top = vocabulary.vocab_size - 1
    ids = {role: top - i for i, role in enumerate(_SENTINEL_ROLES)}
    return SpecialTokens(pad=0, eos=1, unk=2, sep=1, ordinary=(3, vocabulary.vocab_size - extra),
                         **ids)
