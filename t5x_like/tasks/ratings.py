"""Sentence-pair rating tasks for the learned metric (``configs/learned_metric.py``).

Importing this module (``data.task_modules="t5x_like.tasks.ratings"``) registers:

- ``metric_pairs``: synthetic (reference, candidate) pairs of the default corpus with the
  mean of BLEU and ROUGE as target (``data.metric_pairs``), ``SYNTHETIC_PAIRS`` per split,
  made on first read (seeded, the same every time);
- ``sick_relatedness``: SICK's human relatedness ratings (Marelli et al., 2014; CC BY-NC-SA
  3.0, see ``t5x_like/data/SICK_README.md``), shipped as ``t5x_like/data/sick_relatedness.tsv``:
  2000 train, 495 validation (SICK's trial set) and 1000 test pairs, scores 1..5 mapped
  to 0..1.

Any ratings TSV becomes a task with ``register_ratings_task(name, path)``, e.g. in a file named
by ``data.task_modules``. Each example's ``inputs`` is ``reference [SEP] candidate`` as token
ids (each side cut to half of ``inputs_length``, so the candidate is never cut away; the
encoder rows add [CLS] in front and [SEP] behind); its ``targets`` is the score as text, which
the encoder's regression head reads back as a number (``finetune.data.EncoderRows``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import seqio
import tensorflow as tf

from t5x_like.data import corpus, metric_pairs
from t5x_like.errors import UserError
from t5x_like.tasks.pretraining import SOURCES
from t5x_like.tasks.text_to_text import text_features

SYNTHETIC_TASK = "metric_pairs"
SICK_TASK = "sick_relatedness"
SICK_FILE = Path(__file__).resolve().parent.parent / "data" / "sick_relatedness.tsv"
SYNTHETIC_PAIRS = {"train": 30_000, "validation": 300}  # 6000 were memorised (see RESULTS)
SYNTHETIC_SEED = 0


def pair_inputs(dataset: tf.data.Dataset, sequence_length: dict | None,
                output_features: dict) -> tf.data.Dataset:
    """``reference``/``candidate`` strings -> ``inputs`` = reference ids, EOS ([SEP]),
    candidate ids; each side cut so both fit ``inputs_length`` with [CLS], [SEP], [SEP]."""
    vocab = output_features["inputs"].vocabulary
    eos = tf.constant([vocab.eos_id], tf.int32)
    length = (sequence_length or {}).get("inputs")
    first, second = metric_pairs.pair_lengths(length) if length else (None, None)

    def join(x: dict) -> dict:
        reference = tf.cast(vocab.encode_tf(x["reference"]), tf.int32)[:first]
        candidate = tf.cast(vocab.encode_tf(x["candidate"]), tf.int32)[:second]
        out = {k: v for k, v in x.items() if k not in ("reference", "candidate")}
        out["inputs"] = tf.concat([reference, eos, candidate], 0)
        return out

    return dataset.map(join, num_parallel_calls=tf.data.AUTOTUNE)


def register_pairs_task(name: str, pairs_of_split: Callable[[str], Sequence[metric_pairs.Pair]],
                        splits: Sequence[str], *, score_range: tuple[float, float] | None = None,
                        source: str = "", vocabulary: seqio.Vocabulary | None = None
                        ) -> seqio.Task:
    """Registers (or replaces) task ``name`` over ``pairs_of_split(split)`` for each of
    ``splits``; ``score_range`` (lo, hi) maps scores linearly to 0..1."""
    if score_range is not None and not score_range[1] > score_range[0]:
        raise UserError(f"score_range must be (low, high) with high > low, got {score_range}")

    def scaled(score: float) -> float:
        if score_range is None:
            return score
        return (score - score_range[0]) / (score_range[1] - score_range[0])

    def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None):
        del shuffle_files, seed  # one in-memory "file"; seqio shuffles examples
        rows = pairs_of_split(split)
        return tf.data.Dataset.from_tensor_slices({
            "reference": tf.constant([p.reference for p in rows], tf.string),
            "candidate": tf.constant([p.candidate for p in rows], tf.string),
            "targets": tf.constant([f"{scaled(p.score):.4f}" for p in rows], tf.string),
        })

    seqio.TaskRegistry.remove(name)  # registering again replaces
    try:
        task = seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
            output_features=text_features(vocabulary),
            preprocessors=[seqio.preprocessors.tokenize, pair_inputs,
                           seqio.preprocessors.append_eos_after_trim],
            metric_fns=[],
        )
    except ValueError as e:
        raise UserError(f"cannot register task {name!r}: {e}") from None
    SOURCES[name] = source or name
    return task


def register_ratings_task(name: str, path: str | Path, *,
                          score_range: tuple[float, float] | None = None) -> seqio.Task:
    """A task over a ratings TSV (``data.metric_pairs.read_ratings``: its split column, or a
    stable-hash train/validation split)."""
    rows = metric_pairs.read_ratings(path)  # read once, here: a bad file stops the import
    return register_pairs_task(name, rows.__getitem__, sorted(rows), score_range=score_range,
                               source=str(path))


@functools.lru_cache(maxsize=4)
def synthetic(split: str, num_pairs: int | None = None, seed: int = SYNTHETIC_SEED
              ) -> tuple[metric_pairs.Pair, ...]:
    """The synthetic pairs of ``split`` (references from that split of the default corpus;
    validation draws its perturbations with ``seed + 1``, train with ``seed``)."""
    n = SYNTHETIC_PAIRS[split] if num_pairs is None else num_pairs
    split_seed = seed + 1 if split == "validation" else seed
    return tuple(metric_pairs.synthetic_pairs(corpus.default_corpus_texts(split), num_pairs=n,
                                              seed=split_seed))


def register_synthetic_task(name: str = SYNTHETIC_TASK, *, num_pairs: dict | None = None,
                            seed: int = SYNTHETIC_SEED) -> seqio.Task:
    """The synthetic pretraining pairs (``num_pairs``: {split: count})."""
    counts = {**SYNTHETIC_PAIRS, **(num_pairs or {})}
    return register_pairs_task(name, lambda split: synthetic(split, counts[split], seed),
                               corpus.SPLITS, source="default corpus, perturbed (BLEU/ROUGE)")


register_synthetic_task()
register_ratings_task(SICK_TASK, SICK_FILE, score_range=(1.0, 5.0))
