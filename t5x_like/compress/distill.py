"""Knowledge distillation losses and DistilBERT's initialisation.

Losses follow ``losses.py``: sums with their weights, divided once by the trainer.

- ``soft_target_cross_entropy``: ``T^2 * sum_v -p_teacher(v; T) log p_student(v; T)`` per
  scored position (Hinton et al.; the ``T^2`` keeps the gradient scale independent of T).
- hard-label cross-entropy: ``losses.cross_entropy_with_z_loss`` (not written again here).
- ``hidden_cosine``: ``1 - cos(h_student, h_teacher)`` per real token (DistilBERT).
- ``hidden_mse``: mean squared error over the hidden dimension, after a learned projection
  when the widths differ (TinyBERT's ``H_s W_h``).
- ``attention_mse``: mean squared error between attention probability maps, averaged over
  heads and keys, per real query (TinyBERT's attention transfer, on softmax outputs).
- ``task_distillation``: soft + hard CE on any classifier's logits, for task-time
  (fine-tuning) distillation.

``layer_map`` pairs student and teacher layers uniformly (TinyBERT's ``g(m) = m N_t / N_s``);
``distilbert_init`` builds a student from every other teacher layer (Sanh et al., 2019).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import losses
from t5x_like.errors import UserError


@dataclasses.dataclass(frozen=True)
class DistillWeights:
    """Loss weights and temperature; the defaults are DistilBERT's."""

    temperature: float = 2.0
    alpha_ce: float = 5.0  # soft targets
    alpha_mlm: float = 2.0  # hard labels
    alpha_cos: float = 1.0  # last hidden state, cosine
    alpha_hidden_mse: float = 0.0  # every mapped layer, MSE (TinyBERT)
    alpha_attention: float = 0.0  # every mapped layer's attention maps, MSE (TinyBERT)

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserError(f"distillation temperature must be positive, got {self.temperature}")
        for f in dataclasses.fields(self):
            if f.name.startswith("alpha") and getattr(self, f.name) < 0:
                raise UserError(f"distillation weight {f.name} must be >= 0, got "
                                f"{getattr(self, f.name)}")


# --------------------------------------------------------------------------- losses


def soft_target_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array,
                              weights: jax.Array, temperature: float) -> jax.Array:
    """Sum over positions of ``weights * T^2 * CE(softmax(t / T), softmax(s / T))``."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    ce = -jnp.sum(jax.nn.softmax(t) * log_p_student, axis=-1)
    return temperature**2 * jnp.sum(ce * weights)


def hidden_cosine(student: jax.Array, teacher: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum over positions of ``weights * (1 - cos(student, teacher))`` ([..., H] each)."""
    s, t = student.astype(jnp.float32), jax.lax.stop_gradient(teacher.astype(jnp.float32))
    cos = jnp.sum(s * t, -1) / jnp.maximum(jnp.linalg.norm(s, axis=-1)
                                           * jnp.linalg.norm(t, axis=-1), 1e-8)
    return jnp.sum((1.0 - cos) * weights)


def hidden_mse(student: jax.Array, teacher: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum over positions of ``weights * mean_h (student - teacher)^2``."""
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    return jnp.sum(jnp.mean(jnp.square(student.astype(jnp.float32) - t), -1) * weights)


def attention_mse(student: jax.Array, teacher: jax.Array, weights: jax.Array) -> jax.Array:
    """Maps [B, heads, L, L]; sum over queries of ``weights[b, q] * mean_{heads, keys} d^2``."""
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    d2 = jnp.mean(jnp.square(student.astype(jnp.float32) - t), axis=(1, 3))  # [B, L]
    return jnp.sum(d2 * weights)


def task_distillation(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      weights: jax.Array, *, temperature: float, alpha_soft: float,
                      alpha_hard: float) -> dict[str, jax.Array]:
    """Task-time distillation of any classifier (logits [..., classes]): metric sums with
    ``loss = alpha_soft * T^2 soft CE + alpha_hard * hard CE``."""
    sums = losses.cross_entropy_with_z_loss(student_logits, labels, weights)
    soft = soft_target_cross_entropy(student_logits, teacher_logits, weights, temperature)
    return {**sums, "soft_cross_entropy": soft,
            "loss": alpha_soft * soft + alpha_hard * sums["loss"]}


def layer_map(student_layers: int, teacher_layers: int) -> np.ndarray:
    """Teacher index of each student hidden state 0..N_s (0 = embeddings): ``i * N_t / N_s``."""
    if teacher_layers % student_layers:
        raise UserError(f"the teacher's {teacher_layers} layers do not divide evenly among the "
                        f"student's {student_layers}; choose a student depth that divides it")
    return np.arange(student_layers + 1) * (teacher_layers // student_layers)


def encoder_distillation(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                         features: Mapping[str, jax.Array], w: DistillWeights,
                         projection=None) -> dict[str, jax.Array]:
    """Metric sums for MLM distillation from the two encoders' outputs.

    ``features``: ``targets`` / ``weights`` at the MLM head's positions (``mlm_logits`` of
    both models, [B, P, V]) and ``attention_mask`` [B, L]. The soft and hard terms are sums
    over the scored (masked) tokens; the cosine, hidden and attention terms are means over
    real tokens, rescaled to the same normaliser so that ``loss / weight`` is DistilBERT's
    weighted sum of means.
    """
    weights = features["weights"].astype(jnp.float32)
    sums = losses.cross_entropy_with_z_loss(student["mlm_logits"], features["targets"], weights)
    scored = sums["weight"]
    tokens = features["attention_mask"].astype(jnp.float32)
    real = jnp.maximum(jnp.sum(tokens), 1.0)
    soft = soft_target_cross_entropy(student["mlm_logits"], teacher["mlm_logits"], weights,
                                     w.temperature)
    out = {"cross_entropy": sums["cross_entropy"], "correct": sums["correct"], "weight": scored,
           "distill/soft_cross_entropy": soft, "distill/weight": scored}
    loss = w.alpha_ce * soft + w.alpha_mlm * sums["loss"]
    if w.alpha_cos:
        cos = hidden_cosine(student["last_hidden_state"], teacher["last_hidden_state"], tokens)
        out["distill/cosine"] = cos / real * scored
        loss += w.alpha_cos * out["distill/cosine"]
    if w.alpha_hidden_mse or w.alpha_attention:
        pairs = layer_map(len(student["hidden_states"]) - 1, len(teacher["hidden_states"]) - 1)
    if w.alpha_hidden_mse:
        hs = student["hidden_states"]
        if projection is not None:
            hs = projection(hs)
        mse = sum(hidden_mse(hs[i], teacher["hidden_states"][j], tokens)
                  for i, j in enumerate(pairs))
        out["distill/hidden_mse"] = mse / real * scored
        loss += w.alpha_hidden_mse * out["distill/hidden_mse"]
    if w.alpha_attention:
        att = sum(attention_mse(student["attentions"][i - 1], teacher["attentions"][j - 1],
                                tokens)
                  for i, j in enumerate(pairs) if i)
        out["distill/attention_mse"] = att / real * scored
        loss += w.alpha_attention * out["distill/attention_mse"]
    out["loss"] = loss
    return out


# --------------------------------------------------------------------------- initialisation


def distilbert_init(teacher: Mapping[str, Any], teacher_layers: int, student: Mapping[str, Any],
                    student_layers: int) -> dict:
    """Student parameters with every shared-shape tensor copied from the teacher: embeddings,
    heads and layer ``i * N_t / N_s`` (every other layer when the student is half as deep).

    Both trees are pure dicts of an ``EncoderModel`` (scanned stacks or layer lists); widths
    must match. Tensors the teacher lacks keep the student's own initialisation.
    """
    picks = layer_map(student_layers, teacher_layers)[:-1]  # 0, 2, 4, ... for N_t = 2 N_s

    def copy(t: Any, s: Any, path: str, stacked: bool) -> Any:
        if isinstance(s, Mapping):
            if t is None:
                return dict(s)
            out = {}
            for key, value in s.items():
                if path == "encoder/layers" and not stacked:  # a list: {0: ..., 1: ...}
                    out[key] = copy(t.get(int(picks[key])), value, f"{path}/{key}", False)
                else:
                    out[key] = copy(t.get(key), value, f"{path}/{key}".strip("/"), stacked)
            return out
        if t is None:
            return s
        t = np.asarray(t)
        if stacked and "encoder/layers/" in path + "/":
            t = t[picks]
        if t.shape != np.shape(s):
            raise UserError(f"DistilBERT initialisation copies {path} but the teacher's shape "
                            f"{t.shape} differs from the student's {np.shape(s)}; give the "
                            "student the teacher's widths (only the depth may differ)")
        return jnp.asarray(t, dtype=s.dtype)

    layers = student["encoder"]["layers"]
    stacked = not all(isinstance(k, int) or str(k).isdigit() for k in layers)
    teacher_stacked = not all(isinstance(k, int) or str(k).isdigit()
                              for k in teacher["encoder"]["layers"])
    if stacked != teacher_stacked:
        raise UserError("DistilBERT initialisation needs teacher and student with the same "
                        "model.scan_layers")
    return copy(teacher, student, "", stacked)
