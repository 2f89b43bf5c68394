"""T5's pretraining preprocessing as seqio preprocessors: tokenise, append EOS, concatenate
the whole stream, split it into raw chunks of ``sequence_length["targets"]`` tokens.

The objective (span corruption, MLM, ...) runs later, inside the jitted step; the host only
delivers raw chunks. Documents are separated by EOS (id 1) and a chunk may hold the end of
one document and the start of the next, as in T5 (the remainder of the stream is dropped).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import seqio
import tensorflow as tf

from t5x_like.errors import UserError


def concatenate_and_split(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                          output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Token stream -> {"targets": int32[length]} chunks, across document boundaries."""
    del output_features  # seqio passes it; the chunk length is all this needs
    if not sequence_length or not sequence_length.get("targets"):
        raise UserError("pretraining tasks need sequence_length['targets'] (the raw chunk "
                        "length) when their dataset is requested")
    length = int(sequence_length["targets"])
    tokens = dataset.map(lambda ex: ex["targets"])
    # rebatch == unbatch().batch(length) on the flat stream, without one element per token.
    chunks = tokens.rebatch(length, drop_remainder=True)
    return chunks.map(lambda t: {"targets": tf.ensure_shape(t, [length])})


def pretraining_preprocessors(text_key: str) -> list[Callable[..., tf.data.Dataset]]:
    """The preprocessors of every pretraining task: the text field becomes "targets", is
    tokenised with EOS appended, (cacheable by seqio here), then concatenated and chunked."""
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.preprocessors.append_eos,
        seqio.CacheDatasetPlaceholder(),
        concatenate_and_split,
    ]
