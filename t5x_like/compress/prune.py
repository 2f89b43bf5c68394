"""Pruning: attention-head importance, magnitude and movement pruning, structured head removal.

- ``head_importance``: Michel et al. (2019): ``I_h = |sum over batches dL/d mask_h|`` at
  ``mask = 1``, where ``mask_h`` scales head h's output (the encoder's ``head_mask``); a head
  whose removal would not change the loss to first order scores 0.
- ``cubic_sparsity``: Zhu & Gupta's (2017) schedule ``s_t = s_f + (s_i - s_f)(1 - p)^3`` with
  ``p`` the fraction of the pruning window ``[begin, end]`` elapsed (0 before, ``s_f`` after).
- ``magnitude_masks`` keeps the largest |W| of each prunable matrix; ``movement_scores``
  accumulates Sanh et al.'s (2020) movement ``-dL/dW * W``, measured with the update the
  optimizer applied (``W * (W_new - W_old)``, the gradient step in the optimizer's geometry),
  and ``movement_masks`` keeps the highest scores. Masks are applied by zeroing the weights
  after every update, so a checkpoint's zeros are its masks.
- ``remove_heads`` drops heads from the q/k/v/out arrays of an unscanned encoder and returns
  the smaller model (``layer_num_heads``), equal to the masked one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.errors import UserError

METHODS = ("none", "magnitude", "movement")
PRUNABLE = (("attention", "query"), ("attention", "key"), ("attention", "value"),
            ("attention", "out"), ("ffn", "wi"), ("ffn", "wo"))


# --------------------------------------------------------------------------- heads


def head_importance(loss_of_mask: Callable[[jax.Array, Any], jax.Array], num_layers: int,
                    num_heads: int, batches: Iterable[Any], *,
                    normalize_layers: bool = False) -> np.ndarray:
    """[N, heads] importance: |dL/d head_mask| summed over ``batches`` (Michel et al.).

    ``loss_of_mask(head_mask, batch)`` is the model's loss with the head mask applied.
    ``normalize_layers`` divides each layer's scores by their L2 norm (their paper's option).
    """
    grad = jax.jit(jax.grad(loss_of_mask))
    ones = jnp.ones((num_layers, num_heads), jnp.float32)
    total = np.zeros((num_layers, num_heads), np.float64)
    for batch in batches:
        total += np.asarray(grad(ones, batch), np.float64)
    scores = np.abs(total)
    if normalize_layers:
        scores /= np.maximum(np.linalg.norm(scores, axis=1, keepdims=True), 1e-20)
    return scores


def heads_to_keep(importance: np.ndarray, num_remove: int) -> list[list[int]]:
    """Per layer, the heads that survive removing the ``num_remove`` least important overall."""
    order = np.argsort(importance, axis=None, kind="stable")[:num_remove]
    drop = set(map(tuple, np.stack(np.unravel_index(order, importance.shape), 1).tolist()))
    return [[h for h in range(importance.shape[1]) if (layer, h) not in drop]
            for layer in range(importance.shape[0])]


def remove_heads(params: Mapping, config, keep: list[list[int]]) -> tuple[dict, Any]:
    """(params, config) of the encoder with only the ``keep`` heads of each layer.

    The query/key/value kernels [H, n, d] and biases [n, d] and the output kernel [n, d, H]
    lose the removed heads' slices; nothing else changes, so the result computes exactly what
    the original computes with those heads masked to 0. Needs an unscanned, unshared stack.
    """
    if config.layer_sharing != "none" or config.scan_layers:
        raise UserError("head removal needs model.scan_layers=False and layer_sharing='none' "
                        "(layers of different widths cannot be stacked)")
    if len(keep) != config.num_layers:
        raise UserError(f"keep lists {len(keep)} layers, the encoder has {config.num_layers}")
    current = config.layer_num_heads or (config.num_heads,) * config.num_layers
    layers = {}
    for i, heads in enumerate(keep):
        if any(not 0 <= h < current[i] for h in heads) or len(set(heads)) != len(heads):
            raise UserError(f"layer {i} keeps heads {heads}, not distinct heads of its "
                            f"{current[i]}")
        layer = jax.tree.map(np.asarray, dict(params["encoder"]["layers"][i]))
        attention = dict(layer["attention"])
        idx = np.asarray(heads, np.int64)
        for name in ("query", "key", "value"):
            dense = dict(attention[name])
            dense["kernel"] = dense["kernel"][:, idx]
            dense["bias"] = dense["bias"][idx]
            attention[name] = dense
        out = dict(attention["out"])
        out["kernel"] = out["kernel"][idx]
        attention["out"] = out
        layer["attention"] = attention
        layers[i] = layer
    new = dict(params)
    new["encoder"] = {**params["encoder"], "layers": layers}
    return new, dataclasses.replace(config, layer_num_heads=tuple(len(h) for h in keep))


# --------------------------------------------------------------------------- schedules, masks


def cubic_sparsity(step: jax.Array | int, final: float, begin: int, end: int,
                   initial: float = 0.0) -> jax.Array:
    """Zhu & Gupta's cubic ramp from ``initial`` at ``begin`` to ``final`` at ``end``."""
    span = max(end - begin, 1)
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - begin) / span, 0.0, 1.0)
    value = final + (initial - final) * (1.0 - progress) ** 3
    return jnp.where(jnp.asarray(step) < begin, 0.0, value)


def keep_top(scores: jax.Array, sparsity: jax.Array, per_leading: bool) -> jax.Array:
    """0/1 mask keeping the ``1 - sparsity`` highest scores of the tensor (of each slice along
    the leading axis when ``per_leading``: one matrix per layer of a scanned stack)."""
    def one(s):
        flat = s.reshape(-1)
        k = jnp.floor(sparsity * flat.size).astype(jnp.int32)  # how many to drop
        ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
        return (ranks >= k).astype(s.dtype).reshape(s.shape)

    return jax.vmap(one)(scores) if per_leading else one(scores)


def prunable_paths(student: Mapping) -> list[tuple]:
    """Paths (inside the student's params) of the encoder layers' matrices."""
    layers = student["encoder"]["layers"]
    units = [(k,) for k in layers if isinstance(k, int) or str(k).isdigit()] or [()]
    return [("encoder", "layers", *u, group, name, "kernel") for u in units
            for group, name in PRUNABLE if group in _get(student, ("encoder", "layers", *u))]


def is_stacked(student: Mapping) -> bool:
    layers = student["encoder"]["layers"]
    return not any(isinstance(k, int) or str(k).isdigit() for k in layers)


def _get(tree: Mapping, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping, path: tuple, value: Any) -> dict:
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return out


def score_key(path: tuple) -> str:
    """The flat name a prunable matrix's movement score is stored under."""
    return "__".join(str(p) for p in path)


def apply_pruning(old: Mapping, new: Mapping, scores: Mapping | None, *, method: str,
                  sparsity: jax.Array) -> tuple[dict, dict | None]:
    """After an update: (student params with the pruned weights zeroed, new movement scores).

    ``old``/``new``: the student's params before and after the optimizer step; ``scores``:
    the movement scores before it (``method='movement'``), keyed by ``score_key``.
    """
    if method not in METHODS[1:]:
        raise UserError(f"pruning method must be one of {METHODS[1:]}, got {method!r}")
    stacked = is_stacked(new)
    out, new_scores = dict(new), ({} if scores is not None else None)
    for path in prunable_paths(new):
        w_new = _get(new, path)
        if method == "magnitude":
            mask = keep_top(jnp.abs(w_new), sparsity, stacked)
        else:
            w_old = _get(old, path)
            score = scores[score_key(path)] + w_old * (w_new - w_old)
            new_scores[score_key(path)] = score
            mask = keep_top(score, sparsity, stacked)
        out = _set(out, path, w_new * mask)
    return out, new_scores


def sparsity_of(student: Mapping) -> float:
    """Fraction of exact zeros among the prunable matrices (the masks a checkpoint holds)."""
    zeros = total = 0
    for path in prunable_paths(student):
        w = np.asarray(_get(student, path))
        zeros += int((w == 0).sum())
        total += w.size
    return zeros / max(total, 1)
