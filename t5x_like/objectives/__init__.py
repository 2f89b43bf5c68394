"""Pretraining objectives: pure jnp functions (key, raw tokens) -> features, run in the step."""

from t5x_like.objectives.span_corruption import (
    noise_span_counts,
    span_corruption,
    span_corruption_lengths,
)

__all__ = ["noise_span_counts", "span_corruption", "span_corruption_lengths"]
