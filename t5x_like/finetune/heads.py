"""Task heads on an encoder: sequence classification / regression on [CLS] or the pooled
[CLS], token classification, extractive span QA; and the feature-based read-out (one chosen
layer, or ELMo's learned softmax-weighted sum of all layers times a scale).

Each loss returns T5X-style sums (``loss``, ``weight``, ``correct``, ...), so means are exact
over any split of the data (``families.base.summarize``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t5x_like.errors import UserError
from t5x_like.models import layers as L

HEADS = ("classification", "regression", "token_classification", "span_qa")
POOLINGS = ("cls", "pooled")


class Head(nnx.Module):
    """dense H -> outputs (+ bias); ``layer_weights``/``gamma`` for a weighted sum of layers."""

    def __init__(self, kind: str, hidden: int, num_labels: int, *, num_states: int,
                 weighted_sum: bool, std: float, rngs: nnx.Rngs):
        if kind not in HEADS:
            raise UserError(f"config field finetune.head={kind!r} is not one of {HEADS}")
        outputs = {"classification": num_labels, "token_classification": num_labels,
                   "regression": 1, "span_qa": 2}[kind]
        if outputs < 1 or (kind.endswith("classification") and outputs < 2):
            raise UserError(f"finetune.head={kind!r} needs at least 2 labels "
                            "(finetune.label_names)")
        self.kernel = L.make_param(rngs, L.normal(std), (hidden, outputs), ("embed", "classes"),
                                   jnp.float32)
        self.bias = L.make_param(rngs, jax.nn.initializers.zeros, (outputs,), ("classes",),
                                 jnp.float32)
        if weighted_sum:  # softmax(0) = equal weights at the start
            self.layer_weights = L.make_param(rngs, jax.nn.initializers.zeros, (num_states,),
                                              (None,), jnp.float32)
            self.gamma = L.make_param(rngs, jax.nn.initializers.ones, (), (), jnp.float32)


def mix_layers(hidden_states: jax.Array, head: dict, layer: int) -> jax.Array:
    """Features [B, L, H] from every layer's output [N + 1, B, L, H]: the weighted sum when the
    head has ``layer_weights``, else ``hidden_states[layer]`` (-1 = the last layer)."""
    if "layer_weights" in head:
        w = jax.nn.softmax(head["layer_weights"])
        return head["gamma"] * jnp.einsum("n,nblh->blh", w, hidden_states.astype(jnp.float32))
    n = hidden_states.shape[0]
    if not -n <= layer < n:
        raise UserError(f"finetune.feature_layer={layer} is outside the {n} hidden states "
                        f"(0 = embeddings, {n - 1} = last layer)")
    return hidden_states[layer]


def logits(head: dict, x: jax.Array) -> jax.Array:
    return jnp.einsum("...h,hc->...c", x.astype(jnp.float32), head["kernel"]) + head["bias"]


def classification_sums(out: jax.Array, labels: jax.Array, valid: jax.Array) -> dict:
    """Cross-entropy on [B, C] logits; ``valid`` [B] drops padding rows."""
    valid = valid.astype(jnp.float32)
    ce = jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, labels[:, None], -1)[:, 0]
    correct = (jnp.argmax(out, -1) == labels).astype(jnp.float32)
    loss = jnp.sum(ce * valid)
    return {"loss": loss, "cross_entropy": loss, "correct": jnp.sum(correct * valid),
            "weight": jnp.sum(valid)}


def regression_sums(out: jax.Array, target: jax.Array, valid: jax.Array) -> dict:
    """Squared error on [B, 1] outputs; ``abs_error`` sums |error| for the MAE."""
    valid = valid.astype(jnp.float32)
    err = out[:, 0] - target.astype(jnp.float32)
    loss = jnp.sum(jnp.square(err) * valid)
    return {"loss": loss, "squared_error": loss, "abs_error": jnp.sum(jnp.abs(err) * valid),
            "weight": jnp.sum(valid)}


def token_classification_sums(out: jax.Array, labels: jax.Array) -> dict:
    """Cross-entropy per token on [B, L, C]; labels < 0 (padding, [CLS], sub-words) ignored."""
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    ce = jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, safe[..., None], -1)[..., 0]
    correct = (jnp.argmax(out, -1) == safe).astype(jnp.float32)
    loss = jnp.sum(ce * valid)
    return {"loss": loss, "cross_entropy": loss, "correct": jnp.sum(correct * valid),
            "weight": jnp.sum(valid)}


def span_logits(out: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start and end logits [B, L], padding masked out."""
    neg = jnp.finfo(jnp.float32).min
    keep = attention_mask > 0
    return jnp.where(keep, out[..., 0], neg), jnp.where(keep, out[..., 1], neg)


def span_sums(out: jax.Array, attention_mask: jax.Array, start: jax.Array, end: jax.Array,
              valid: jax.Array) -> dict:
    """(CE(start) + CE(end)) / 2 per example (BERT's SQuAD loss); ``correct`` = both right
    (token-level exact match), ``span/...`` the two boundaries separately."""
    valid = valid.astype(jnp.float32)
    s_logits, e_logits = span_logits(out, attention_mask)

    def ce(lg, gold):
        return jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, gold[:, None], -1)[:, 0]

    loss = jnp.sum(0.5 * (ce(s_logits, start) + ce(e_logits, end)) * valid)
    s_ok = jnp.argmax(s_logits, -1) == start
    e_ok = jnp.argmax(e_logits, -1) == end
    return {"loss": loss, "cross_entropy": loss, "weight": jnp.sum(valid),
            "correct": jnp.sum((s_ok & e_ok) * valid),
            "span/start_correct": jnp.sum(s_ok * valid),
            "span/end_correct": jnp.sum(e_ok * valid), "span/weight": jnp.sum(valid)}


def best_span(out: jax.Array, attention_mask: jax.Array, max_answer: int) -> jax.Array:
    """[B, 2] (start, end) maximising start + end logits with start <= end < start + max_answer."""
    s, e = span_logits(out, attention_mask)
    length = s.shape[-1]
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed = (j >= i) & (j < i + max_answer)
    scores = jnp.where(allowed, s[:, :, None] + e[:, None, :], jnp.finfo(jnp.float32).min)
    flat = jnp.argmax(scores.reshape(scores.shape[0], -1), -1)
    return jnp.stack([flat // length, flat % length], -1)
