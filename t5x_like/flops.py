"""Analytic model FLOPs of a training step, written out term by term, for TFLOP/s and MFU.

Only matrix multiplications count: ``2 * m * n * k`` for an ``[m, k] @ [k, n]`` product in the
forward pass, and a training step is 3x the forward pass (the backward pass computes the
gradient with respect to both operands of every product: two more of the same size). Norms,
softmax, activations and the optimizer update are left out, as in the usual MFU convention
(PaLM appendix B, MaxText); attention is counted as computed (full T x S scores, also where a
causal mask zeroes half of them).

Each family adds its own count: a function ``(family, batch_size) -> Count`` in ``COUNTERS``
under the family's name (``config.family``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from t5x_like.errors import UserError


class Count(NamedTuple):
    """Forward-pass FLOPs per step by term, and the tokens the step processes."""

    forward: dict[str, int]
    tokens: int

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def training(self) -> int:
        """Forward + backward: 3x the forward matmuls."""
        return 3 * self.forward_total


def t5_forward_flops(model, *, batch: int, inputs_length: int, targets_length: int
                     ) -> dict[str, int]:
    """Forward FLOPs of T5 (``model`` is a ``T5Config``) on ``batch`` examples.

    Per layer and token, with ``hk = num_heads * d_kv``, L encoder and T decoder positions:
    self-attention q, k, v and output projections ``4 * 2 * d_model * hk``, scores
    ``2 * S * hk`` and the weighted sum of values ``2 * S * hk`` (S keys); cross-attention
    projects q and the output per decoder token and k, v per encoder token; the gated-GELU
    feed-forward has three ``d_model x d_ff`` kernels (ReLU: two); logits ``2 * d_model * vocab``
    per decoder token.
    """
    d, f, hk, v = model.d_model, model.d_ff, model.num_heads * model.d_kv, model.vocab_size
    L, T = inputs_length, targets_length
    mlp = (3 if model.feed_forward_proj == "gated-gelu" else 2) * 2 * d * f
    encoder_attention = L * (4 * 2 * d * hk + 2 * 2 * L * hk)
    decoder_self = T * (4 * 2 * d * hk + 2 * 2 * T * hk)
    decoder_cross = T * (2 * 2 * d * hk + 2 * 2 * L * hk) + L * (2 * 2 * d * hk)
    return {
        "encoder_attention": batch * model.num_encoder_layers * encoder_attention,
        "encoder_mlp": batch * model.num_encoder_layers * L * mlp,
        "decoder_self_attention": batch * model.num_decoder_layers * decoder_self,
        "decoder_cross_attention": batch * model.num_decoder_layers * decoder_cross,
        "decoder_mlp": batch * model.num_decoder_layers * T * mlp,
        "logits": batch * T * 2 * d * v,
    }


def _t5(family, batch_size: int) -> Count:
    inputs, targets = family.config.data.inputs_length, family.targets_length
    terms = t5_forward_flops(family.model_config, batch=batch_size, inputs_length=inputs,
                             targets_length=targets)
    return Count(terms, batch_size * (inputs + targets))


COUNTERS: dict[str, Callable[[object, int], Count]] = {"t5": _t5}


def count(family, batch_size: int) -> Count:
    """The FLOP count of one training step of ``family`` on ``batch_size`` examples."""
    name = family.config.family
    if name not in COUNTERS:
        raise UserError(
            f"no FLOP count for family {name!r}; add a counter to t5x_like.flops.COUNTERS "
            f"(known: {sorted(COUNTERS)})"
        )
    return COUNTERS[name](family, batch_size)
