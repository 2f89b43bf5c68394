"""A seqio source over texts held in memory: the default corpus and user .txt files.

Documents are shuffled (when seqio asks for shuffling) with the given seed and reshuffled
each epoch, before seqio shards them by example; every host uses the same seed, so the
hosts' shards stay disjoint in every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf


class InMemoryTextSource(seqio.FunctionDataSource):
    """Examples {"text": str} for each split, from Python lists."""

    def __init__(self, texts_by_split: Mapping[str, Sequence[str]]):
        self._texts = {split: list(texts) for split, texts in texts_by_split.items()}
        super().__init__(
            dataset_fn=self._dataset_fn,
            splits=list(self._texts),
            num_input_examples={split: len(t) for split, t in self._texts.items()},
        )

    def _dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None):
        texts = self._texts[split]
        ds = tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts, dtype=tf.string)})
        if shuffle_files and texts:
            ds = ds.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
        return ds

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **unused) -> tf.data.Dataset:
        # The parent warns that an uncached FunctionDataSource shuffles badly; this one holds
        # every document in memory and shuffles them all, so the warning does not apply.
        del unused
        if shard_info and shard_info.num_shards > 1:  # seqio shards by example instead
            raise ValueError("InMemoryTextSource is sharded by seqio, per example")
        return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)
