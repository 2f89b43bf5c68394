"""Pretraining objectives: pure jnp functions (key, raw tokens) -> features, run in the step."""

from t5x_like.objectives.span_corruption import (
    noise_span_counts,
    span_corruption,
    span_corruption_lengths,
)

__all__ = ["noise_span_counts", "span_corruption", "span_corruption_lengths"]

from t5x_like.objectives.permutation import (  # noqa: E402
    num_predictions,
    permutation_lm,
    sample_spans,
    stream_masks,
)

__all__ += ["num_predictions", "permutation_lm", "sample_spans", "stream_masks"]
