"""Saving fine-tuned runs: only the trainable part where the pretrained weights are frozen.

In the modes that never change the pretrained weights (feature, adapters, LoRA, prompt,
prefix) the trainer's checkpoint holds ``params`` without ``"model"`` (the head and PEFT
tensors), the optimizer state (which exists only for those, ``modes.optimizer``), the step
and the RNG. Loading reads the pretrained checkpoint named by ``finetune.init_checkpoint``
again and merges the saved part back into it. ``save_trainable``/``load_merged`` do the same
for a standalone folder (what one shares: kilobytes for a LoRA, not the whole model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from t5x_like.errors import UserError
from t5x_like.finetune.modes import FROZEN_MODEL_MODES


def stores_model(mode: str) -> bool:
    """Whether a checkpoint of ``mode`` must hold the (changing) pretrained weights."""
    return mode not in FROZEN_MODEL_MODES


def trainable_part(params: Mapping, mode: str) -> dict:
    """The parameters a checkpoint of ``mode`` keeps."""
    return dict(params) if stores_model(mode) else {k: v for k, v in params.items()
                                                    if k != "model"}


def saved_state(state: Mapping, mode: str) -> dict:
    """The train state as saved: ``params`` cut to ``trainable_part``."""
    return {**state, "params": trainable_part(state["params"], mode)}


def merge(model_params: Mapping, saved_params: Mapping) -> dict:
    """Full parameters from the pretrained model and a saved trainable part."""
    if "model" in saved_params:
        return dict(saved_params)
    return {"model": model_params, **saved_params}


def save_trainable(directory: str | Path, params: Mapping, mode: str) -> Path:
    """Writes ``trainable_part(params, mode)`` to ``directory`` (orbax, no pickle)."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, trainable_part(params, mode), force=True)
    return directory


def load_merged(directory: str | Path, model_params: Mapping, abstract_params: Any,
                mode: str) -> dict:
    """Reads a ``save_trainable`` folder and merges it into ``model_params``.

    ``abstract_params`` is the full tree (``jax.eval_shape`` of the family's init); only its
    trainable part is read, so a folder saved in another mode fails with one sentence.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise UserError(f"{directory} is not a saved fine-tuning folder")
    target = trainable_part(abstract_params, mode)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(directory, target)
    except Exception as e:  # orbax raises several types for a tree that does not match
        raise UserError(f"{directory} does not hold the trainable part of finetune.mode="
                        f"{mode!r} for this model ({type(e).__name__}); was it saved in "
                        "another mode or for another model?") from e
    return merge(model_params, jax.tree.map(lambda x: x, restored))
