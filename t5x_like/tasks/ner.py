"""Named-entity recognition as token classification: CoNLL-2003's English NER tags from TFDS
(``conll2003/conll2003:1.0.0``; train / validation / test), one label per word.

The task's ``inputs`` are the sentence's words tokenised one by one and concatenated (with a
SentencePiece vocabulary this is exactly the tokenisation of the words joined by spaces);
``token_labels`` gives each word's tag id at its first piece and -1 at the other pieces, BERT's
convention for CoNLL (Devlin et al., 2019, §5.3), so the head is trained and scored on first
pieces only. ``targets`` is empty (the labels are per token); ``inputs_pretokenized`` keeps the
words joined by spaces. The tag names (IOB, as TFDS lists them) are ``CONLL2003_TAGS``; span-level
precision / recall / F1 over them come from ``seqeval`` in ``evaluation/tagging.py``.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from t5x_like.tasks.pretraining import default_vocabulary
from t5x_like.tasks.text_to_text import tfds_source

CONLL2003 = "tfds:conll2003/conll2003:1.0.0"
# TFDS's ClassLabel names of conll2003's "ner" feature, in id order.
CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def word_pieces(dataset: tf.data.Dataset, output_features, words: str = "tokens",
                tags: str = "ner") -> tf.data.Dataset:
    """Words + per-word tags -> ``inputs`` (pieces), ``token_labels`` (tag at each word's first
    piece, -1 elsewhere), an empty ``targets`` and ``inputs_pretokenized``. Words that encode to
    no piece lose their tag; examples whose word and tag counts differ keep the shorter."""
    vocabulary = output_features["inputs"].vocabulary

    def fn(ex: dict) -> dict:
        n = tf.minimum(tf.size(ex[words]), tf.size(ex[tags]))
        text, labels = ex[words][:n], tf.cast(ex[tags][:n], tf.int32)
        pieces = vocabulary.encode_tf(text)
        ids = tf.cast(pieces.flat_values, tf.int32)
        has_piece = pieces.row_lengths() > 0
        first = tf.boolean_mask(pieces.row_starts(), has_piece)
        token_labels = tf.tensor_scatter_nd_update(
            tf.fill(tf.shape(ids), -1), tf.cast(first[:, None], tf.int32),
            tf.boolean_mask(labels, has_piece))
        return {"inputs": ids, "targets": tf.zeros([0], tf.int32),
                "token_labels": token_labels,
                "inputs_pretokenized": tf.strings.reduce_join(text, separator=" ")}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def register(vocabulary: seqio.Vocabulary | None = None) -> None:
    """Registers ``conll2003_ner`` (reads TFDS's prepared copy; nothing is downloaded here)."""
    vocab = vocabulary or default_vocabulary()
    seqio.TaskRegistry.remove("conll2003_ner")
    seqio.TaskRegistry.add(
        "conll2003_ner",
        source=tfds_source(CONLL2003, SPLITS),
        output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
        preprocessors=[word_pieces],
    )
