"""Speech tasks for masked acoustic modelling: a TFDS audio dataset -> log-mel frames.

    register_speech_task(name, "tfds:NAME/CONFIG:VERSION", audio_key="audio")

Each example becomes ``{"frames": float32 [T, num_mel_bins]}`` (``data/audio_features.py``);
nothing is tokenised, so the task's vocabulary is seqio's pass-through placeholder. The
built-in ``speech_commands`` task reads TFDS ``speech_commands`` (1-second clips of spoken
words at 16 kHz; train / validation splits), registered without reading anything: the data is
prepared with ``tfds build speech_commands`` before training, or mocked in tests.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from t5x_like.data.audio_features import MelSettings, log_mel
from t5x_like.errors import UserError
from t5x_like.tasks.pretraining import SOURCES  # what `t5x-like tasks` shows as the source

SPEECH_COMMANDS = "speech_commands"
MEL_SETTINGS: dict[str, MelSettings] = {}  # each speech task's frame settings


def _frames(settings: MelSettings, audio_key: str):
    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: {"frames": log_mel(ex[audio_key], settings)},
                      num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


def register_speech_task(name: str, source: str, *, audio_key: str = "audio",
                         settings: MelSettings | None = None) -> seqio.Task:
    """Registers the TFDS audio dataset ``source`` ("tfds:NAME/CONFIG:VERSION"; its train and
    validation splits) as the frames task ``name``; registering again replaces it."""
    if not source.startswith("tfds:") or ":" not in source[5:]:
        raise UserError(f"speech task source {source!r} must be tfds:NAME/CONFIG:VERSION")
    settings = settings or MelSettings()
    seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.TfdsDataSource(tfds_name=source[5:],
                                    splits={"train": "train", "validation": "validation"}),
        output_features={"frames": seqio.ContinuousFeature(dtype=tf.float32, rank=2)},
        preprocessors=[_frames(settings, audio_key)],
    )
    SOURCES[name] = source
    MEL_SETTINGS[name] = settings
    return task


def register() -> None:
    register_speech_task(SPEECH_COMMANDS, "tfds:speech_commands:0.0.3")
