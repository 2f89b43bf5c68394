"""Audio BERT: Mockingjay's masked acoustic modelling on log-mel frames of a speech task.

Host data (``batches``): a registered speech task (``tasks/speech.py``; default TFDS
``speech_commands``) gives each clip's log-mel frames; each is cut or zero-padded to
``data.inputs_length * model.downsample`` frames, with ``frame_mask`` marking the real
ones. On device (``features``): ``model.downsample`` consecutive frames are stacked per
position (a position is real only if all its frames are), spans of positions are masked
(``objectives/acoustic.py``) and the encoder reconstructs them; the loss is the L1 error on the
selected positions (``l1`` per value; ``mask/selected`` is the realised masked fraction).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import seqio
import tensorflow as tf
from flax import nnx

from t5x_like.data import tf_runtime
from t5x_like.data.registry import task_provider
from t5x_like.errors import UserError, check
from t5x_like.families.base import Family
from t5x_like.models.audio import AudioConfig, AudioEncoder
from t5x_like.objectives.acoustic import AcousticMasking, l1_sums, mask_frames


class AudioBertFamily(Family):
    """Masked acoustic modelling (module docstring)."""

    module_class = AudioEncoder
    config_class = AudioConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        o = config.objective
        self.masking = AcousticMasking(mask_ratio=o.mask_ratio, span=o.span,
                                       zero_prob=o.zero_prob, random_prob=o.random_prob)

    # ------------------------------------------------------------------ schema
    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="masked_acoustic", mask_ratio=0.15, span=7, zero_prob=0.8,
                    random_prob=0.1)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        o = c.objective
        check(o.name == "masked_acoustic", f"objective.name {o.name!r} is not 'masked_acoustic'")
        check(0.0 < o.mask_ratio < 1.0, f"objective.mask_ratio must lie in (0, 1), got "
              f"{o.mask_ratio}")
        check(o.span >= 1, f"objective.span must be >= 1, got {o.span}")
        check(o.zero_prob >= 0 and o.random_prob >= 0 and o.zero_prob + o.random_prob <= 1,
              f"objective.zero_prob ({o.zero_prob}) and random_prob ({o.random_prob}) must be "
              ">= 0 and add up to at most 1")
        check(c.data.task != "shakespeare", "Audio BERT reads frames, not text: set data.task "
              "to a speech task, e.g. speech_commands")
        AudioConfig.from_dict(c.model.to_dict())

    # ------------------------------------------------------------------ data
    @property
    def raw_length(self) -> int:
        return self.config.data.inputs_length * self.model_config.downsample

    def batches(self, *, split: str, batch_size: int, shuffle: bool, repeat: bool,
                skip_batches: int, shard_index: int, num_shards: int
                ) -> Iterator[dict[str, np.ndarray]]:
        """``{'frames': float32 [B, F, mel], 'frame_mask': bool [B, F]}``, F = raw_length;
        batch k of a run is the same whatever came before (resume skips k batches)."""
        tf_runtime.configure()
        name = self.config.data.task
        provider = task_provider(name, split, "frames", "a speech task; register it with "
                                 "t5x_like.tasks.speech.register_speech_task")
        mel, length = self.model_config.num_mel_bins, self.raw_length
        shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
        ds = provider.get_dataset(None, split=split, shuffle=shuffle, seed=self.config.seed,
                                  shard_info=shard, num_epochs=None if repeat else 1,
                                  try_in_mem_cache=False)

        def fit(ex):
            frames = ex["frames"][:length]
            n = tf.shape(frames)[0]
            frames = tf.pad(frames, [[0, length - n], [0, 0]])
            return {"frames": tf.ensure_shape(frames, [length, None]),
                    "frame_mask": tf.sequence_mask(n, length)}

        spec = ds.element_spec["frames"].shape
        if spec[-1] is not None and spec[-1] != mel:
            raise UserError(f"task {name!r} gives {spec[-1]} mel bins per frame; set "
                            f"model.num_mel_bins={spec[-1]}")
        ds = ds.map(fit).skip(skip_batches * batch_size).batch(batch_size, drop_remainder=True)
        return ds.prefetch(2).as_numpy_iterator()

    # ------------------------------------------------------------------ objective
    def stack(self, frames: jax.Array, frame_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, F, mel] -> [B, F / R, R * mel] positions, and which positions are all real."""
        r = self.model_config.downsample
        b, f, mel = frames.shape
        positions = frames.reshape(b, f // r, r * mel)
        return positions, jnp.all(frame_mask.reshape(b, f // r, r), axis=-1)

    def features(self, batch: dict, key: jax.Array) -> dict:
        targets, valid = self.stack(batch["frames"], batch["frame_mask"])
        masked = mask_frames(targets, valid, key, self.masking)
        return {"inputs": masked["inputs"], "targets": targets, "selected": masked["selected"],
                "valid": valid}

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        c = self.model_config
        out = self.model(params)(
            batch["inputs"], batch["valid"],
            enable_dropout=train and max(c.hidden_dropout_rate, c.attention_dropout_rate) > 0,
            rngs=nnx.Rngs(dropout=key) if key is not None else None)
        sums = l1_sums(out["prediction"], batch["targets"], batch["selected"], batch["valid"])
        return sums["loss"], sums
