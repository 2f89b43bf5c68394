"""A pretraining task's text as documents of segments, for the sentence-pair layouts.

What a document is (``examples_per_document``):

- N > 0: the task's examples, in source order, are the consecutive segments of running text
  (the default corpus's speeches in play order, the lines of a text file), and each run of N
  of them is a document;
- 0: each example is a document (an article from TFDS, say) whose sentences, cut after the
  ``sentence_ends`` ids, are its segments.
"""

from __future__ import annotations

import numpy as np
import seqio

from t5x_like.data.pipeline import pretraining_provider

_DOCUMENTS: dict[tuple, tuple[object, list]] = {}


def task_documents(name: str, split: str, vocabulary, *, examples_per_document: int,
                   sentence_ends: tuple[int, ...] = ()) -> list[list[np.ndarray]]:
    """The documents of ``split`` of task or mixture ``name``: lists of int32 segments.

    Examples come through seqio in source order with the task's own preprocessing up to its
    cache point (tokenised, EOS appended; the EOS is dropped here). Grouping: see the module
    docstring. Held in memory and cached per process (re-registering the task invalidates it).
    """
    provider = pretraining_provider(name, split, vocabulary)
    key = (name, split, examples_per_document, sentence_ends,
           getattr(vocabulary, "sentencepiece_model_file", id(vocabulary)))
    cached = _DOCUMENTS.get(key)
    if cached is not None and cached[0] is provider:
        return cached[1]
    eos = vocabulary.eos_id
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    documents: list[list[np.ndarray]] = []
    for task in tasks:
        if split not in task.splits:
            continue
        ds = task.preprocess_precache(task.source.get_dataset(split=split, shuffle=False))
        # Ragged batches: iterating one example at a time is ~10x slower in tf.data.
        examples = []
        for rows in ds.map(lambda ex: ex["targets"]).ragged_batch(4096):
            splits = rows.row_splits.numpy()
            for ids in np.split(rows.flat_values.numpy().astype(np.int32), splits[1:-1]):
                ids = ids[:-1] if ids.size and ids[-1] == eos else ids
                if ids.size:
                    examples.append(ids)
        if examples_per_document:
            documents += [examples[i:i + examples_per_document]
                          for i in range(0, len(examples), examples_per_document)]
        else:
            documents += [_sentences(ids, sentence_ends) for ids in examples]
    _DOCUMENTS[key] = (provider, documents)
    return documents


def _sentences(ids: np.ndarray, ends: tuple[int, ...]) -> list[np.ndarray]:
    """``ids`` cut after every sentence-ending id (the last piece may end without one)."""
    cuts = np.flatnonzero(np.isin(ids, ends)) + 1
    return [s for s in np.split(ids, cuts) if s.size]
