"""StructBERT's sentence structural objective on the host: ``[CLS] S1 [SEP] S2 [SEP]`` rows
whose label says whether S2 is the segment after S1 (0), the segment before it (1) or from
another document (2), each with p = 1/3 (Wang et al., 2020, §2.2).

Rows are gathered as BERT's NSP pairs are (``sentence_pairs``: walk a document, gather
segments up to the target length, cut them at a random segment boundary into A and B):
label 0 keeps (A, B); label 1 swaps them, so the second segment is the one that came first;
label 2 replaces B by a run of segments from a random other document (the segments after A's
cut go back to be used next, as in NSP). The label is drawn first, an exact fair 3-way die.
Randomness, sharding, resume and the batch stream are ``sentence_pairs``'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from t5x_like.data import sentence_pairs as sp
from t5x_like.errors import UserError

LABEL = "sentence_structure_label"
NEXT, PREVIOUS, OTHER = 0, 1, 2


def _three_way(rng: np.random.Generator) -> int:
    return int(rng.integers(3))


def structure_examples(documents: list[sp.Document], rng: np.random.Generator,
                       max_tokens: int, short_seq_prob: float) -> list[tuple[np.ndarray, ...]]:
    """One epoch of (S1, S2, label) from every document, in a shuffled order."""
    return sp.pair_examples(documents, rng, max_tokens, short_seq_prob, _three_way,
                            other_document=frozenset({OTHER}), swapped=frozenset({PREVIOUS}))


def structure_pair_batches(documents: list[sp.Document], *, length: int, batch_size: int,
                           seed: int, special: sp.SpecialTokens, shard_index: int = 0,
                           num_shards: int = 1, skip_batches: int = 0,
                           short_seq_prob: float = 0.1, repeat: bool = True
                           ) -> Iterator[dict[str, np.ndarray]]:
    """``input_ids``, ``token_type_ids``, ``attention_mask`` [B, length] and
    ``sentence_structure_label`` [B] (0 next, 1 previous, 2 other document); endless, or the
    whole batches of the first epoch with ``repeat=False``."""
    if not 0 <= shard_index < num_shards:
        raise UserError(f"shard_index={shard_index} must be in [0, num_shards={num_shards}).")
    if batch_size < 1 or skip_batches < 0 or length < 5:
        raise UserError(f"batch_size={batch_size} must be positive, skip_batches="
                        f"{skip_batches} not negative and length={length} at least 5.")
    special.require("cls", "sep")
    shard = documents[shard_index::num_shards]
    if len(shard) < 2:
        raise UserError("the sentence structural objective needs at least two documents per "
                        f"shard (for other-document segments); shard {shard_index} has "
                        f"{len(shard)}.")

    def examples(e: int) -> list[tuple[np.ndarray, ...]]:
        rng = np.random.default_rng([seed, shard_index, num_shards, e])
        return structure_examples(shard, rng, length - 3, short_seq_prob)

    def epoch(e: int) -> dict[str, np.ndarray]:
        return sp._encode_pairs(examples(e), length, special, LABEL)

    epoch_size = len(examples(0))
    if epoch_size == 0 or (not repeat and epoch_size < batch_size):
        raise UserError(f"shard {shard_index} of {num_shards} holds {epoch_size} sentence "
                        f"structure rows, fewer than one batch of {batch_size}; add text or "
                        "lower data.batch_size")
    return sp._batches(epoch, batch_size, skip_batches * batch_size, examples,
                       epochs=None if repeat else 1)
