"""Q8BERT: symmetric linear 8-bit quantization of weights and activations (Zafrir et al., 2019).

A tensor with range ``r`` (max|x|) is quantized with scale ``s = 127 / r`` to
``q = clip(round(x * s), -127, 127)`` and read back as ``q / s``: the rounding error is at most
``1 / (2 s)``. Training sees the fake-quantized value; gradients pass straight through (STE) for
|x| <= r and are 0 for the clipped values beyond it. Weights use their own current max;
activations (every dense layer's input) use a range kept as an exponential moving average of
the batch maxima with decay 0.9999 (the first observation sets it). The arithmetic (fake
quantization, int8 matmuls) lives in ``models/int8.py``: the encoder (``models/encoder.py``,
``quantize='fake'``) calls it without importing this package, and holds these ranges as scalar
``input_range`` parameters that receive no gradient; ``update_ranges`` is the EMA step a
training family runs after each update (``families/distill.py``).

Export: ``to_int8`` turns the parameters of a fake-quantized model into those of a
``quantize='int8'`` model: int8 kernels and tables with their float32 scales. That model
multiplies int8 inputs by int8 kernels with int32 accumulation (``jax.lax.dot_general`` with
``preferred_element_type=int32``) and rescales once, which is the fake-quantized model's
arithmetic up to float32 summation order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.models.encoder import TABLES
from t5x_like.models.int8 import (  # noqa: F401  re-exported: the quantizer's arithmetic
    QMAX,
    active_range,
    dequantize,
    fake_quant,
    fake_quant_weight,
    int8_tensordot,
    quantize_int8,
    scale_of,
)

EMA_DECAY = 0.9999


# --------------------------------------------------------------------------- ranges (EMA)

# An observation's name in ``activation_absmax`` -> the parameter it updates.
_RANGE_OF = {"absmax": "input_range", "decoder_absmax": "decoder_range"}


def ema(stored: jax.Array, observed: jax.Array, decay: float = EMA_DECAY) -> jax.Array:
    """Q8BERT's range update; the first observation (stored = 0) is taken as it is."""
    return jnp.where(stored > 0, decay * stored + (1.0 - decay) * observed, observed)


def update_ranges(params: dict, absmax: Mapping, decay: float = EMA_DECAY) -> dict:
    """``params`` with every range moved towards the batch maxima ``absmax`` (the model's
    ``activation_absmax`` output, which mirrors the parameter tree)."""
    out = dict(params)
    for name, value in absmax.items():
        if isinstance(value, Mapping):
            out[name] = update_ranges(params[name], value, decay)
        else:
            target = _RANGE_OF[name]
            out[target] = ema(params[target], jnp.asarray(value, jnp.float32), decay)
    return out


# --------------------------------------------------------------------------- export


def to_int8(params: Mapping[str, Any]) -> dict:
    """Parameters of a ``quantize='fake'`` encoder -> those of its ``quantize='int8'`` twin.

    Every dense ``kernel`` (recognised by its sibling ``input_range``) and embedding table
    becomes int8 with a ``kernel_scale`` / ``<table>_scale`` computed exactly as the fake
    quantizer does; layer stacks get one scale per layer. Everything else is kept.
    """
    def convert(node: Mapping, stacked: bool) -> dict:
        out = {}
        for name, value in node.items():
            if isinstance(value, Mapping):
                out[name] = convert(value, stacked)
            elif name == "kernel" and "input_range" in node:
                out["kernel"], out["kernel_scale"] = _quantize_tensor(value, stacked)
            elif name in TABLES:
                out[name], out[f"{name}_scale"] = _quantize_tensor(value, False)
            else:
                out[name] = value
        return out

    result = {}
    for name, value in params.items():
        if name == "encoder" and isinstance(value, Mapping):
            # A scanned stack holds every layer's tensors in one array: one scale per layer.
            layers = value.get("layers", {})
            scanned = bool(layers) and all(not str(k).isdigit() for k in layers)
            result[name] = {k: convert(v, scanned and k == "layers") if isinstance(v, Mapping)
                            else v for k, v in value.items()}
        else:
            result[name] = convert(value, False) if isinstance(value, Mapping) else value
    return result


def _quantize_tensor(w: Any, stacked: bool) -> tuple[np.ndarray, np.ndarray]:
    w = jnp.asarray(w, jnp.float32)
    if stacked:
        q, s = jax.vmap(lambda a: quantize_int8(a, jnp.max(jnp.abs(a))))(w)
    else:
        q, s = quantize_int8(w, jnp.max(jnp.abs(w)))
    return np.asarray(q), np.asarray(s)


def int8_config(config):
    """The ``quantize='int8'`` twin of an encoder config (same shapes, int8 storage)."""
    return dataclasses.replace(config, quantize="int8")
