"""Registered seqio tasks and mixtures looked up by name, with one-sentence errors.

Only seqio's own registries are read here: registering (the built-in tasks in
``t5x_like.tasks``, a user's task modules) is done above this layer, before a name is looked up.
"""

from __future__ import annotations

import difflib

import seqio

from t5x_like.data import tf_runtime
from t5x_like.errors import UserError


def provider_names() -> list[str]:
    """Every registered task and mixture name, sorted."""
    return sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()})


def unknown_name_error(name: str, what: str = "task or mixture") -> UserError:
    """A UserError for an unregistered name, listing the closest registered ones."""
    names = provider_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(names)}"
    return UserError(f"no {what} named {name!r} is registered; {hint}")


def get_provider(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture ``name``; a UserError names close matches if none."""
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    raise unknown_name_error(name)


def task_provider(name: str, split: str, feature: str, kind: str) -> seqio.DatasetProviderBase:
    """The registered task or mixture ``name``, with ``split`` and the ``feature`` that makes
    it ``kind`` (e.g. "a pretraining task; register ...": the sentence's ending)."""
    tf_runtime.configure()
    provider = get_provider(name)
    if split not in provider.splits:
        raise UserError(f"task {name!r} has no split {split!r}; it has "
                        f"{', '.join(sorted(provider.splits))}")
    if feature not in provider.output_features:
        raise UserError(f"task {name!r} has no {feature!r} feature, so it is not {kind}")
    return provider


def pretraining_provider(name: str, split: str,
                         vocabulary: seqio.Vocabulary | None = None) -> seqio.DatasetProviderBase:
    """The registered task or mixture ``name``, checked to have ``split`` and pretraining
    text ("targets") in ``vocabulary`` (when given): the guard against training on ids from
    another vocabulary."""
    provider = task_provider(name, split, "targets",
                             "a pretraining task; register its text with "
                             "t5x_like.tasks.register_text_task")
    task_vocab = provider.output_features["targets"].vocabulary
    if vocabulary is not None and vocabulary != task_vocab:
        file = getattr(task_vocab, "sentencepiece_model_file", task_vocab)
        raise UserError(f"task {name!r} tokenises with {file}, not the model's vocabulary; "
                        "register it with vocabulary=get_vocabulary(data.vocab_path)")
    return provider
