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

from t5x_like.objectives.denoising import (  # noqa: E402
    BART_PAPER,
    BartNoise,
    TokenIds,
    bart_noise,
    document_rotation,
    sentence_permutation,
    text_infilling,
    token_deletion,
    token_masking,
)
from t5x_like.objectives.mass import mass_fragment  # noqa: E402
from t5x_like.objectives.unilm import (  # noqa: E402
    attention_mask,
    prefix_lm_mask,
    sample_mode,
    unilm_example,
    unilm_masking,
)

__all__ += [
    "BART_PAPER",
    "BartNoise",
    "TokenIds",
    "bart_noise",
    "document_rotation",
    "sentence_permutation",
    "text_infilling",
    "token_deletion",
    "token_masking",
    "mass_fragment",
    "attention_mask",
    "prefix_lm_mask",
    "sample_mode",
    "unilm_example",
    "unilm_masking",
]

from t5x_like.objectives.masking import (  # noqa: E402
    MaskingConfig,
    albert_masking,
    bert_masking,
    electra_masking,
    mask,
    mask_batch,
    spanbert_masking,
    word_start_table,
)
from t5x_like.objectives.replaced_tokens import sample_replacements  # noqa: E402
from t5x_like.objectives.spans import SpanLengths, sample_span_lengths  # noqa: E402

__all__ += [
    "MaskingConfig",
    "SpanLengths",
    "albert_masking",
    "bert_masking",
    "electra_masking",
    "mask",
    "mask_batch",
    "sample_replacements",
    "sample_span_lengths",
    "spanbert_masking",
    "word_start_table",
]
