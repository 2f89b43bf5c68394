"""StructBERT's word structural objective (Wang et al., 2020, §2.2), in jnp: after MLM masking,
shuffle K = 3 consecutive unmasked tokens at 5% of the positions and predict, at each
shuffled position, its original token.

``shuffle_ngrams(key, inputs, tokens, available, config)`` works on one sequence of static
length L, vmapped over a batch inside the jitted step like ``masking.mask``:

1. The positions are tiled by blocks of K from a random offset o in [0, K) (blocks
   [o + jK, o + (j+1)K)), so every position is equally likely to open a block and chosen
   blocks never overlap. A block is a candidate when all its K tokens are ``available``
   (ordinary tokens the MLM left unselected).
2. ``round(rate * n)`` candidate blocks (n = ordinary tokens in the row; at most
   ``max_ngrams`` = ceil(rate * L), at most the candidates) are chosen uniformly at random.
3. Each chosen block is permuted by one of the K! - 1 non-identity permutations, uniformly:
   every chosen block really is reordered (a permutation may leave one token in place, and
   equal tokens may make a shuffle invisible; every slot is predicted all the same).

Outputs: ``inputs`` [L] (the row with the blocks shuffled), and per slot (K x max_ngrams of
them, the shuffled positions ascending, then 0s): ``positions``, ``position_targets`` (the
original tokens there), ``position_weights``; ``starts`` [L] marks the chosen blocks' first
positions (for tests and statistics).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.errors import UserError
from t5x_like.objectives.spans import uniforms_from_bits

MAX_K = 5  # 5! - 1 = 119 permutations in the table; K = 3 (the paper's) needs 5


@dataclasses.dataclass(frozen=True)
class WordStructure:
    """The word structural objective's settings (hashable: static under jit). The paper's:
    K = 3, rate 0.05."""

    length: int
    rate: float = 0.05
    k: int = 3

    def __post_init__(self) -> None:
        if not 2 <= self.k <= MAX_K:
            raise UserError(f"objective.word_shuffle_k must be in [2, {MAX_K}], got {self.k}")
        if not 0.0 < self.rate * self.k <= 1.0:
            raise UserError(f"objective.word_shuffle_rate x k must lie in (0, 1], got "
                            f"{self.rate} x {self.k}")

    @property
    def max_ngrams(self) -> int:
        return max(1, math.ceil(self.rate * self.length))

    @property
    def slots(self) -> int:
        return self.k * self.max_ngrams

    def permutations(self) -> np.ndarray:
        """int32 [K! - 1, K]: every permutation of range(K) but the identity."""
        return np.array(list(itertools.permutations(range(self.k)))[1:], np.int32)


def shuffle_ngrams(key: jax.Array, inputs: jax.Array, tokens: jax.Array, available: jax.Array,
                   eligible: jax.Array, config: WordStructure) -> dict[str, jax.Array]:
    """Shuffles blocks of ``available`` tokens of one row (see the module docstring).

    ``inputs`` int [L]: the row after MLM corruption; ``tokens`` int [L]: the original row;
    ``available`` bool [L]: ordinary tokens the MLM did not select; ``eligible`` bool [L]:
    all ordinary tokens (the rate's denominator).
    """
    length, k, slots = inputs.shape[0], config.k, config.slots
    if length != config.length:
        raise UserError(f"shuffle_ngrams was configured for rows of {config.length} tokens, "
                        f"got {length}")
    pos = jnp.arange(length, dtype=jnp.int32)
    bits = jax.random.bits(key, (3, length + 1), jnp.uint32)
    offset = (bits[0, 0] % jnp.uint32(k)).astype(jnp.int32)
    blocks = (length - 1 + k) // k + 1  # every block id below, the partial ones included
    block = (pos - offset + k) // k  # block 0: the partial one before the offset
    index = (pos - offset + k) % k  # place inside the block
    full = jax.ops.segment_sum(available.astype(jnp.int32), block, num_segments=blocks) == k
    full = full & (jnp.arange(blocks) > 0)
    budget = jnp.round(config.rate * eligible.sum(dtype=jnp.int32).astype(jnp.float32))
    budget = jnp.minimum(budget.astype(jnp.int32), config.max_ngrams)
    priority = jnp.where(full, uniforms_from_bits(bits[1, :blocks]), 2.0)
    width = min(config.max_ngrams, blocks)
    first = jax.lax.top_k(-priority, width)[1]
    rank = jnp.full((blocks,), blocks, jnp.int32).at[first].set(jnp.arange(width))
    chosen = full & (rank < budget)

    table = jnp.asarray(config.permutations())
    which = (bits[2, :blocks] % jnp.uint32(table.shape[0])).astype(jnp.int32)
    shuffled = chosen[block]
    source = pos - index + table[which[block], index]
    out_inputs = jnp.where(shuffled, inputs[jnp.clip(source, 0, length - 1)], inputs)

    slot = jnp.where(shuffled, jnp.cumsum(shuffled, dtype=jnp.int32) - 1, slots)
    positions = jnp.zeros((slots,), jnp.int32).at[slot].set(pos, mode="drop")
    filled = jnp.arange(slots) < shuffled.sum()
    return {
        "inputs": out_inputs,
        "positions": positions,
        "position_targets": jnp.where(filled, tokens[positions], 0),
        "position_weights": filled.astype(jnp.float32),
        "starts": shuffled & (index == 0),
    }
