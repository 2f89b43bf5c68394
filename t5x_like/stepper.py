"""What every search loop sees: a model as a ``Stepper`` and the ``Options`` that pick tokens.

Below both ``decoding.py`` (which builds steppers and runs greedy decoding and sampling) and
``beam_search.py`` (which ``decoding`` calls), so the two import one way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from t5x_like.errors import UserError

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Options:
    """How to pick tokens. ``beam_size > 1``: beam search; else ``temperature > 0``: sampling;
    else greedy (``temperature == 0`` is the argmax, its limit).

    ``alpha`` is transformers' ``length_penalty``: a finished beam scores
    ``sum log p / generated_length ** alpha`` (EOS counted). T5X instead divides by
    ``((5 + length) / 6) ** alpha`` (GNMT); we follow transformers, whose outputs we pin.
    ``early_stopping`` as transformers': False (its default) stops a batch row once no running
    beam can beat its worst finished one at the current length; True once ``beam_size``
    hypotheses are finished; "never" only when they can no longer be beaten at any length.
    ``num_return_sequences``: best beams (beam search) or independent draws (sampling) per row.
    """

    beam_size: int = 1
    alpha: float = 1.0  # transformers' default length_penalty
    early_stopping: bool | str = False
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_return_sequences: int = 1

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(f"decoding options: {message}")

        need(self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        need(0.0 < self.top_p <= 1.0, f"top_p must lie in (0, 1], got {self.top_p}")
        need(self.early_stopping in (True, False, "never"),
             f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        need(self.num_return_sequences >= 1,
             f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.beam_size > 1:
            need(self.temperature == 0 and self.top_k == 0 and self.top_p == 1.0,
                 "beam search is deterministic; drop temperature/top_k/top_p or use beam_size=1")
            need(self.num_return_sequences <= self.beam_size,
                 f"num_return_sequences={self.num_return_sequences} exceeds beam_size="
                 f"{self.beam_size}")
        elif self.temperature == 0:
            need(self.top_k == 0 and self.top_p == 1.0,
                 "top_k/top_p only apply when sampling; set temperature > 0 (1.0 = the model's "
                 "own distribution)")
            need(self.num_return_sequences == 1,
                 "greedy decoding returns one sequence per input; sample (temperature > 0) or "
                 "use beam search for more")

    @property
    def sampling(self) -> bool:
        return self.beam_size == 1 and self.temperature > 0


@dataclasses.dataclass(frozen=True)
class Stepper:
    """A model as next-token logits over a KV cache for N rows (inputs x repeats, row-major).

    ``reorder_axes`` names the cache entries whose row axis beam search must permute (entry ->
    axis); entries left out are equal across a row's repeats (cross-attention keys, masks).
    """

    step: StepFn
    cache: dict[str, jax.Array]
    reorder_axes: Mapping[str, int]
    first_tokens: jax.Array  # [N] fed at ``first_position``
    first_position: jax.Array | int
