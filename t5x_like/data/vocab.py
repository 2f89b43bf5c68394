"""SentencePiece vocabularies with T5's conventions, trained in-process and cached.

T5 ids: pad=0, eos=1, unk=2, no bos; ``extra_ids`` sentinels are appended by seqio and count
down from the top (``<extra_id_0>`` = vocab_size - 1). ``byte_fallback`` means no character
is ever unknown. The default vocabulary (8000 pieces + 100 sentinels = 8100) is trained on the
train split of the embedded Shakespeare corpus the first time anything asks for it, then read
from ``$T5X_LIKE_CACHE`` (default ``~/.cache/t5x_like``).
"""

from __future__ import annotations

import fcntl
import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import seqio

from t5x_like import storage
from t5x_like.data.char_vocab import CharVocabulary, train_char_vocab
from t5x_like.errors import UserError

DEFAULT_VOCAB_SIZE = 8000
DEFAULT_EXTRA_IDS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# SentencePiece's result depends on its thread count; a fixed count makes every machine (and
# every host of a multi-host run, each training its own cached copy) get the same model bytes.
TRAIN_THREADS = 4


def cache_dir() -> Path:
    """Where trained vocabularies live: $T5X_LIKE_CACHE, else ~/.cache/t5x_like."""
    return Path(os.environ.get("T5X_LIKE_CACHE") or Path.home() / ".cache" / "t5x_like")


def default_vocab_path(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """The cached default vocabulary's file; its name says the corpus and the size."""
    return cache_dir() / f"shakespeare_sp{vocab_size}.model"


def train_vocab(texts: Iterable[str], model_path: str | Path,
                vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Trains a unigram SentencePiece model on ``texts`` and writes it atomically to
    ``model_path``. The same texts give the same model bytes (no sampling, no shuffling)."""
    model_path = Path(model_path)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            input_sentence_size=0,  # use every sentence ...
            shuffle_input_sentence=False,  # ... in the given order: deterministic
            max_sentence_length=1 << 16,
            num_threads=TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (8000). Please set it to ..."
        raise UserError(f"cannot train vocabulary {model_path} with {vocab_size} pieces: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    storage.write_atomically(model_path, model.getvalue())  # readers never see half a model
    return model_path


def ensure_default_vocab(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """The default vocabulary's path, training it first if no process has yet.

    A file lock makes racing processes (pytest -n, several hosts sharing a home) train it
    once; the others wait and then read the finished file.
    """
    path = default_vocab_path(vocab_size)
    if path.exists():
        return path
    from t5x_like.data.corpus import default_corpus_texts

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            train_vocab(default_corpus_texts("train"), path, vocab_size)
    return path


class _DefaultVocabulary(seqio.SentencePieceVocabulary):
    """The default vocabulary, trained on first use rather than when a task is registered,
    so that importing ``t5x_like.tasks`` (e.g. for ``t5x-like tasks``) stays cheap."""

    def _model_context(self):
        if not self._model:
            ensure_default_vocab()
        return super()._model_context()


def lazy_default_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """The default vocabulary without training it yet (it trains when first used)."""
    return _DefaultVocabulary(str(default_vocab_path()), extra_ids=extra_ids)


class _ObjectStoreVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePiece model on object storage (gs://), read through ``etils.epath``.

    seqio reads the file with TensorFlow's gfile, whose gs:// client is a second credential
    path and cannot be pointed at an emulator; the bytes are read here instead and turned into
    the same model seqio builds (sentinels appended in reverse as ``<extra_id_N>``).
    """

    def _model_context(self):
        if self._model:
            return self._model
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto.FromString(
            storage.as_path(self.sentencepiece_model_file).read_bytes())
        extra = reversed(range(self._extra_ids)) if self._reverse_extra_ids else range(
            self._extra_ids)
        for i in extra:
            model.pieces.add(piece=f"\u2581<extra_id_{i}>", score=0.0,
                             type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
        sp_model = model.SerializeToString()
        tokenizer = spm.SentencePieceProcessor()
        tokenizer.LoadFromSerializedProto(sp_model)
        self._model = seqio.vocabularies._ModelContext(tokenizer=tokenizer, sp_model=sp_model)
        return self._model


# data.vocab_kind: SentencePiece pieces (the default), UTF-8 bytes (ByT5) or characters.
VOCAB_KINDS = ("sentencepiece", "byte", "char")


def default_char_vocab_path() -> Path:
    """The cached character list of the default corpus (``data/char_vocab.py``)."""
    return cache_dir() / "shakespeare_chars.json"


def ensure_default_char_vocab() -> Path:
    """The default corpus's character list, written first (under a lock) if missing."""
    from t5x_like.data.corpus import default_corpus_texts

    path = default_char_vocab_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            train_char_vocab(default_corpus_texts("train"), path)
    return path


class _DefaultCharVocabulary(CharVocabulary):
    """The default corpus's characters, listed on first use (like ``_DefaultVocabulary``)."""

    @property
    def characters(self) -> tuple[str, ...]:
        if self._chars is None:
            ensure_default_char_vocab()
        return super().characters


def lazy_default_char_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> CharVocabulary:
    """The default corpus's character vocabulary without listing its characters yet."""
    return _DefaultCharVocabulary(default_char_vocab_path(), extra_ids=extra_ids)


# A Hugging Face tokenizer's files (an imported checkpoint's; data/hf_vocab.py), or their folder.
HF_TOKENIZER_NAMES = ("tokenizer.json", "vocab.json", "vocab.txt")


def is_hf_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` names a local Hugging Face tokenizer rather than a SentencePiece model:
    one of ``HF_TOKENIZER_NAMES`` or a folder holding one."""
    if storage.is_remote(path):
        return False
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in HF_TOKENIZER_NAMES)
    return path.name in HF_TOKENIZER_NAMES


def get_vocabulary(path: str | Path | None = None,
                   extra_ids: int = DEFAULT_EXTRA_IDS,
                   kind: str = "sentencepiece") -> seqio.Vocabulary:
    """The vocabulary of ``kind`` (``VOCAB_KINDS``): for "sentencepiece" the .model file at
    ``path`` (local or gs://) or the default one when ``path`` is None, checked to follow T5's
    pad=0 / eos=1 ids, or a Hugging Face tokenizer (``is_hf_tokenizer``: its own ids, no
    sentinels added); for "byte" seqio's ``ByteVocabulary`` (ByT5: pad 0, eos 1, unk 2, byte
    b at b + 3; ``path`` must be empty); for "char" the character list at ``path`` or the
    default corpus's. Every kind keeps ``extra_ids`` sentinels at the top."""
    if kind not in VOCAB_KINDS:
        raise UserError(f"config field data.vocab_kind={kind!r} is not one of {VOCAB_KINDS}")
    if kind == "byte":
        if path:
            raise UserError(f"data.vocab_kind='byte' needs no vocabulary file; clear "
                            f"data.vocab_path (it is {str(path)!r})")
        return seqio.ByteVocabulary(extra_ids=extra_ids)
    if kind == "char":
        if path is None:
            return lazy_default_char_vocabulary(extra_ids)
        if not storage.as_path(path).is_file():
            raise UserError(f"character vocabulary {path} does not exist; fix data.vocab_path "
                            "or write one with t5x_like.data.char_vocab.train_char_vocab")
        vocabulary = CharVocabulary(path, extra_ids=extra_ids)
        vocabulary.characters  # noqa: B018  (read and checked now: one sentence if bad)
        return vocabulary
    if path is None:
        path = ensure_default_vocab()
    elif is_hf_tokenizer(path):
        from t5x_like.data.hf_vocab import HFTokenizerVocabulary  # late: reads tokenizers

        return HFTokenizerVocabulary(path)
    elif not storage.as_path(path).is_file():
        raise UserError(f"vocabulary file {path} does not exist; fix data.vocab_path or train "
                        "one with `t5x-like vocab train`")
    kind = _ObjectStoreVocabulary if storage.is_remote(path) else seqio.SentencePieceVocabulary
    vocabulary = kind(str(path), extra_ids=extra_ids)
    try:
        tokenizer = vocabulary.tokenizer
    except Exception:  # sentencepiece and protobuf raise several types for a bad file
        raise UserError(f"vocabulary file {path} is not a SentencePiece model; point "
                        "data.vocab_path at a .model file") from None
    if (tokenizer.pad_id(), tokenizer.eos_id()) != (PAD_ID, EOS_ID):
        raise UserError(f"vocabulary {path} has pad_id={tokenizer.pad_id()} and eos_id="
                        f"{tokenizer.eos_id()}, but T5-style models need pad=0 and eos=1; "
                        "train one with `t5x-like vocab train`")
    return vocabulary
