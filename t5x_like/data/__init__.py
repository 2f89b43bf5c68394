"""The host side of the data path: corpora and text files -> SentencePiece vocabulary ->
seqio tasks (t5x_like.tasks) -> raw token chunks -> fixed-shape numpy batches per host.

Submodules: ``corpus`` (embedded Shakespeare, .txt sources), ``vocab`` (SentencePiece with T5
ids), ``sources`` (in-memory seqio source), ``chunking`` (concatenate and split),
``pipeline`` (deterministic, resumable, sharded batches), ``tf_runtime`` (TF on CPU, quiet).
Nothing heavy is imported here, so ``import t5x_like.data.corpus`` stays cheap.
"""

import os

# TensorFlow reads this once, when it is first imported (by seqio, in vocab/pipeline).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
