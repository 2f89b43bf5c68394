"""Making encoders smaller: distillation, 8-bit quantization-aware training, pruning, a report.

``distill`` (losses, DistilBERT initialisation), ``quantize`` (Q8BERT fake quantization, EMA
ranges, int8 export), ``prune`` (head importance, magnitude/movement pruning on a cubic schedule,
structured head removal), ``artifacts`` (compressed models as folders) and ``report``
(``t5x-like compress-report``). Nothing is imported here, so the encoder can import
``quantize`` without a cycle.
"""
