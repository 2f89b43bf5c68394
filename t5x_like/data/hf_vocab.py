"""A Hugging Face ``tokenizers`` tokenizer (WordPiece, byte-level BPE) as a seqio Vocabulary.

So an imported BERT or RoBERTa checkpoint trains and evaluates on seqio tasks with the
vocabulary it was trained with. Sources: a ``tokenizer.json`` (everything included), a BERT
``vocab.txt`` (WordPiece; lower-casing from the ``tokenizer_config.json`` beside it, else the
``lowercase`` argument), a RoBERTa/GPT-2 ``vocab.json`` with ``merges.txt`` beside it (byte-level
BPE), or a folder holding one of those. ``encode`` adds no special tokens (seqio's convention:
the pipeline or the objective places [CLS]/[SEP]); ``eos_id`` is the separator ([SEP] or
``</s>``), which seqio appends where a feature asks for EOS. ``pad_id`` is the tokenizer's own
(RoBERTa's is 1), not seqio's 0: batches must carry their padding mask, not infer it from 0.
The tokenizer is loaded on first use, so registering tasks stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from t5x_like.errors import UserError

# Special tokens by role: BERT's WordPiece spelling first, then RoBERTa's BPE spelling.
SPECIAL_TOKENS = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}
_REQUIRED = ("pad", "unk", "cls", "sep")


def _resolve(path: Path) -> tuple[str, Path]:
    """(kind, file): kind is 'json' (tokenizer.json), 'wordpiece' or 'bpe'."""
    if path.is_dir():
        for name, kind in (("tokenizer.json", "json"), ("vocab.txt", "wordpiece"),
                           ("vocab.json", "bpe")):
            if (path / name).is_file():
                return kind, path / name
        raise UserError(f"{path} holds no tokenizer.json, vocab.txt or vocab.json + merges.txt")
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; pass a tokenizer.json, vocab.txt "
                        "or vocab.json (with merges.txt beside it), or their folder")
    if path.suffix == ".txt":
        return "wordpiece", path
    if path.name.endswith("vocab.json"):
        return "bpe", path
    if path.suffix == ".json":
        return "json", path
    raise UserError(f"{path} is not a tokenizer.json, vocab.txt or vocab.json file")


class HFTokenizerVocabulary(seqio.Vocabulary):
    """seqio Vocabulary over a Hugging Face ``tokenizers.Tokenizer``."""

    def __init__(self, path: str | Path, *, lowercase: bool | None = None, extra_ids: int = 0):
        self._kind, self._path = _resolve(Path(path))
        self._lowercase = lowercase
        self._tokenizer = None
        self._ids: dict[str, int | None] = {}
        super().__init__(extra_ids=extra_ids)

    # ------------------------------------------------------------------ loading
    def _wordpiece_lowercase(self) -> bool:
        if self._lowercase is not None:
            return self._lowercase
        config = self._path.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                return bool(json.loads(config.read_text()).get("do_lower_case", True))
            except json.JSONDecodeError as e:
                raise UserError(f"{config} is not valid JSON ({e})") from e
        return True  # BERT's uncased default

    def _load(self):
        import tokenizers
        from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

        try:
            if self._kind == "json":
                tokenizer = tokenizers.Tokenizer.from_file(str(self._path))
            elif self._kind == "wordpiece":
                table = tokenizers.models.WordPiece.read_file(str(self._path))
                tokenizer = BertWordPieceTokenizer(
                    table, lowercase=self._wordpiece_lowercase())._tokenizer
            else:
                merges = self._path.with_name("merges.txt")
                if not merges.is_file():
                    raise UserError(f"{merges} is missing: a byte-level BPE vocab.json needs the "
                                    "merges.txt it was trained with beside it")
                table, merge_list = tokenizers.models.BPE.read_file(str(self._path), str(merges))
                tokenizer = ByteLevelBPETokenizer(table, merge_list)._tokenizer
        except UserError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise UserError(f"cannot read tokenizer {self._path}: {e}") from None
        # A saved tokenizer.json may pad or truncate every encoding (MiniLM's: to 128 tokens);
        # seqio tokenises whole documents and chunks them itself.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        for role, spellings in SPECIAL_TOKENS.items():
            found = [tokenizer.token_to_id(s) for s in spellings]
            found = [(i, s) for i, s in zip(found, spellings, strict=True) if i is not None]
            if not found and role in _REQUIRED:
                raise UserError(f"tokenizer {self._path} has no {role} token (one of "
                                f"{spellings}); BERT-style models need {_REQUIRED}")
            self._ids[role] = found[0][0] if found else None
            if found:  # registered as special: never split, dropped by decode
                tokenizer.add_special_tokens([found[0][1]])
        return tokenizer

    @property
    def tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer

    def _special(self, role: str) -> int | None:
        self.tokenizer  # noqa: B018  (loading fills the ids)
        return self._ids[role]

    # ------------------------------------------------------------------ ids
    @property
    def pad_id(self) -> int:
        return self._special("pad")

    @property
    def eos_id(self) -> int:
        return self._special("sep")

    @property
    def unk_id(self) -> int:
        return self._special("unk")

    @property
    def bos_id(self) -> int:
        return self._special("cls")

    @property
    def cls_id(self) -> int:
        return self._special("cls")

    @property
    def sep_id(self) -> int:
        return self._special("sep")

    @property
    def mask_id(self) -> int | None:
        return self._special("mask")

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of every special token present (masking must never select them)."""
        return tuple(sorted(i for role in SPECIAL_TOKENS
                            if (i := self._special(role)) is not None))

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ python
    def _encode(self, s: str) -> Sequence[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    # ------------------------------------------------------------------ tensorflow
    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """int32 ids [None] for a scalar string; a RaggedTensor [N, None] for a vector."""
        def encode(strings):
            flat = np.asarray(strings.numpy(), object).reshape(-1)
            rows = [self._encode(x.decode("utf-8")) for x in flat]
            lengths = np.array([len(r) for r in rows], np.int64)
            return np.array([i for r in rows for i in r], np.int32), lengths

        s = tf.convert_to_tensor(s, tf.string)
        values, lengths = tf.py_function(encode, [s], (tf.int32, tf.int64))
        values.set_shape([None])
        if s.shape.rank == 0:
            return values
        return tf.RaggedTensor.from_row_lengths(values, lengths)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Strings for int ids [..., L] (one per row)."""
        def decode(array):
            rows = array.numpy().reshape(-1, array.shape[-1])
            return np.array([self._decode(r).encode("utf-8") for r in rows], object)

        ids = tf.convert_to_tensor(ids)
        flat = tf.py_function(decode, [ids], tf.string)
        return tf.reshape(flat, tf.shape(ids)[:-1])

    # ------------------------------------------------------------------ identity
    def __eq__(self, other: object) -> bool:
        return (isinstance(other, HFTokenizerVocabulary) and other._path == self._path
                and other._kind == self._kind and other._lowercase == self._lowercase
                and other.extra_ids == self.extra_ids)

    def __hash__(self) -> int:
        return hash((self._path, self._kind, self._lowercase, self.extra_ids))
