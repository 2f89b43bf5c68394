"""Which parameters train in each fine-tuning mode, and the optimizer that enforces it.

Parameters are ``{"model": pretrained, "head": new task head, "peft": new PEFT tensors}``
(a part is absent when the mode has none). A mode labels every leaf ``train`` or ``freeze``;
``optax.multi_transform`` sends frozen leaves to ``optax.set_to_zero``, so they get no update
and no optimizer state (their Adam moments simply do not exist).

Gradual unfreezing (ULMFiT) trains everything eventually, so every leaf keeps its state; a
stage mask zeroes gradients and updates of the layers still frozen. Stage 0 trains the head,
the top layer and what sits above the layers (final norms, pooler); each further
``stage_steps`` updates unfreeze the next lower layer (a T5 decoder's layers come before its
encoder's); the embeddings come last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from t5x_like.errors import UserError

MODES = ("full", "feature", "adapters", "gradual", "lora", "prompt", "prefix")
PEFT_MODES = ("adapters", "lora", "prompt", "prefix")
FROZEN_MODEL_MODES = ("feature", *PEFT_MODES)  # the pretrained weights never change
_EMBEDDING_NAMES = ("embeddings", "token_embedder", "token_embedding", "embedding_projection")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"config field finetune.mode={mode!r} is not one of {MODES}")


def labels(params: Mapping, mode: str) -> dict:
    """``'train'`` / ``'freeze'`` for every leaf of ``params``."""
    check_mode(mode)
    frozen_model = mode in FROZEN_MODEL_MODES

    def label(part: str):
        tag = "freeze" if part == "model" and frozen_model else "train"
        return jax.tree.map(lambda _: tag, params[part])

    return {part: label(part) for part in params}


def trainable_mask(params: Mapping, mode: str) -> dict:
    """True where a leaf trains in ``mode`` (gradual unfreezing: eventually)."""
    return jax.tree.map(lambda t: t == "train", labels(params, mode))


def optimizer(tx: optax.GradientTransformation, params: Mapping, mode: str, *,
              stages: Mapping | None = None, stage_steps: int = 0
              ) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, ``set_to_zero`` (no state) on the frozen ones; with
    ``stages`` (gradual unfreezing) each leaf's update is zero before its stage begins."""
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               labels(params, mode))
    if stages is None:
        return tx
    gate = unfreeze_gate(stages, stage_steps)
    return optax.chain(gate, tx, gate)


# --------------------------------------------------------------------------- gradual unfreezing


def _is_embedding(path: tuple) -> bool:
    return any(str(p) in _EMBEDDING_NAMES for p in path)


def layer_stages(params: Mapping, stacks: tuple[str, ...], layers: Mapping[str, int],
                 scan: bool) -> tuple[dict, int]:
    """(stage of every leaf, number of stages). A leaf of a scanned stack gets a vector of
    stages, one per layer; stacks are listed bottom first (``("encoder", "decoder")``)."""
    offset, first = 0, {}
    for stack in reversed(stacks):  # top stack first
        first[stack] = offset
        offset += layers[stack]
    embeddings_stage = max(offset - 1, 0) + 1

    def stage(path, leaf):
        path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if path[0] != "model":
            return jnp.zeros((), jnp.int32)
        inner = path[1:]
        if _is_embedding(inner):
            return jnp.asarray(embeddings_stage, jnp.int32)
        if len(inner) >= 2 and inner[0] in first and inner[1] == "layers":
            n, top = layers[inner[0]], first[inner[0]]
            if scan:  # stacked: layer i is at stage top + (n - 1 - i)
                return top + (n - 1 - jnp.arange(n, dtype=jnp.int32))
            return jnp.asarray(top + n - 1 - int(inner[2]), jnp.int32)
        return jnp.zeros((), jnp.int32)

    return jax.tree_util.tree_map_with_path(stage, dict(params)), embeddings_stage + 1


class GateState(NamedTuple):
    count: jax.Array


def unfreeze_gate(stages: Mapping, stage_steps: int) -> optax.GradientTransformation:
    """Zeroes updates of leaves (or stacked rows) whose stage > count // stage_steps."""
    if stage_steps <= 0:
        raise UserError(f"finetune.stage_steps must be positive, got {stage_steps}")

    def init(params):
        del params
        return GateState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        current = state.count // stage_steps

        def gate(u, s):
            open_ = (s <= current).astype(u.dtype)
            return u * open_.reshape(open_.shape + (1,) * (u.ndim - open_.ndim))

        return jax.tree.map(gate, updates, stages), GateState(state.count + 1)

    return optax.GradientTransformation(init, update)
