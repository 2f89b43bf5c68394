"""What every family shares: parameters from a module class, metric sums, the data stream.

A family is T5X's model contract (``loss_fn``, ``score_batch``, ``predict_batch``, ``init``)
around one NNX module. Subclasses set ``module_class`` / ``config_class`` and write
``features`` (the on-device objective) and ``loss_fn``; this base holds the plumbing that
would otherwise be copied into each of them.

Metric sums: ``loss_fn`` returns ``(loss_sum, sums)``. ``sums['loss']`` is what is
differentiated and ``sums['weight']`` its normaliser; every other key is a sum divided, at the
end, by the weight of its group: ``'nsp/correct'`` by ``'nsp/weight'``, ``'correct'`` by
``'weight'``. Sums add up across devices, micro-batches and evaluation batches, so every mean
is exact whatever the split.

Carry: a family whose examples depend on the previous batch (XLNet's memory) returns
``initial_carry``, per-example arrays (batch first) that live in the train state and so in
checkpoints; ``loss_fn`` finds them in ``batch['carry']`` and returns the next batch's in
``sums['carry']``, which is split and concatenated over micro-batches, never summed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like.data import store_input
from t5x_like.data.pipeline import raw_token_batches


def summarize(sums: Mapping[str, Any]) -> dict[str, Any]:
    """Means from metric sums (see the module docstring); ``correct`` is reported as accuracy."""
    out = {}
    for key, value in sums.items():
        group, _, name = key.rpartition("/")
        if name == "weight" or key == "loss":
            continue
        prefix = f"{group}/" if group else ""
        weight = sums[f"{prefix}weight"]
        out[prefix + ("accuracy" if name == "correct" else name)] = value / jnp.maximum(weight, 1.0)
    return out


class Family:
    """Base class: a module built from ``config.model``, with pure-dict parameters."""

    module_class: ClassVar[type]
    config_class: ClassVar[type]  # a frozen dataclass with a strict ``from_dict``

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        self.config = config
        self.vocabulary = vocabulary
        self.vocab_size = vocabulary.vocab_size  # the vocabulary's own size, not the table's
        self.model_config = self.config_class.from_dict(config.model.to_dict())
        abstract = nnx.eval_shape(lambda: self.module_class(self.model_config, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)

    # ------------------------------------------------------------------ schema
    @classmethod
    def model_defaults(cls) -> dict:
        """``config.model``'s fields and defaults: the module config's own, except that the
        embedding rows are derived from the vocabulary unless a config sets them."""
        import dataclasses

        defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
        if "vocab_size" in defaults:
            defaults["vocab_size"] = 0  # 0 = the vocabulary's size rounded up (config.resolve)
        return defaults

    @classmethod
    def objective_defaults(cls) -> dict:
        """``config.objective``'s fields and defaults."""
        return {}

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        """Family-specific checks, before anything compiles (raise UserError)."""
        cls.config_class.from_dict(config.model.to_dict())

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        """Fresh parameters as a pure dict (call under jax.jit with out_shardings)."""
        model = self.module_class(self.model_config, rngs=nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def model(self, params: dict):
        return nnx.merge(self.graphdef, params)

    @functools.cached_property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(self.abstract_params)))

    # ------------------------------------------------------------------ data
    @property
    def raw_length(self) -> int:
        """Tokens per example in the host stream, before the objective runs."""
        return self.config.data.inputs_length

    def batches(
        self,
        *,
        split: str,
        batch_size: int,
        shuffle: bool,
        repeat: bool,
        skip_batches: int,
        shard_index: int,
        num_shards: int,
    ) -> Iterator[dict[str, np.ndarray]]:
        """This host's fixed-shape numpy batches: packed raw chunks (``{'tokens': [B, L]}``)
        unless the family needs more (sentence pairs, document boundaries). With
        ``data.store`` they come from the prepared store (``data/store_input.py``): batch k of
        the run whatever the number of hosts, with no replay to resume."""
        if self.config.data.store:
            d = self.config.data
            stores, rates = self.open_data(split)
            return store_input.token_batches(
                stores, rates, raw_length=self.raw_length, global_batch=batch_size * num_shards,
                seed=self.config.seed, shuffle=shuffle, repeat=repeat, start_batch=skip_batches,
                process_index=shard_index, process_count=num_shards,
                consecutive_batches=self.consecutive_batches, read_threads=d.read_threads,
                prefetch_batches=d.prefetch_batches)
        return raw_token_batches(
            self.config.data.task,
            split=split,
            raw_length=self.raw_length,
            batch_size=batch_size,
            seed=self.config.seed,
            shuffle=shuffle,
            repeat=repeat,
            skip_batches=skip_batches,
            shard_index=shard_index,
            num_shards=num_shards,
            vocabulary=self.vocabulary,
            consecutive_batches=self.consecutive_batches,
        )

    def open_data(self, split: str) -> tuple[list, list[float] | None]:
        """The prepared store splits (and mixing rates) ``split`` reads, opened and checked
        once per process: the trainer calls this before anything compiles, so a missing or
        damaged shard or another vocabulary stops the run in one sentence. ``([], None)``
        without ``data.store``."""
        if not self.config.data.store:
            return [], None
        from t5x_like.tasks.stores import task_stores

        return task_stores(self.config.data.store, self.config.data.task, split,
                           self.vocabulary, verify=self.config.data.store_verify)

    @property
    def consecutive_batches(self) -> int:
        """How many batches a row continues one text (``data.pipeline``); 1 = independent."""
        return 1

    def initial_carry(self, batch_size: int) -> dict | None:
        """The carry before the first batch (module docstring), or None when there is none."""
        return None

    # ------------------------------------------------------------------ contract
    def features(self, batch: dict, key: jax.Array) -> dict:
        """The on-device objective: host batch -> model inputs and targets."""
        raise NotImplementedError

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """``(loss_sum, sums)`` on a batch that already went through ``features``."""
        raise NotImplementedError

    def summarize(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        """Means from summed evaluation metrics (the module's ``summarize``); a family whose
        metric is not a ratio of sums (ELECTRA's AUC, from summed histograms) overrides it."""
        return summarize(sums)

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} does not score sequences")

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} does not generate text")
