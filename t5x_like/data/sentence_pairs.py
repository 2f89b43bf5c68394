"""Host-side inputs that need document boundaries: BERT NSP and ALBERT SOP sentence pairs and
RoBERTa FULL-SENTENCES packing, as deterministic, resumable, sharded numpy batches.

The input is a list of documents, each a list of segments (sentences, speeches) of token ids.
For the default corpus a document is a play and a segment one speech (the corpus splits
train/validation by speech; ``default_corpus_documents`` keeps each play's speeches of a split
in play order), so "the next segment" is the reply that really follows.

Pairs (``nsp``, ``sop``) follow the BERT reference's greedy filling: walk a document, gather
segments until they reach the target length (the maximum, or with ``short_seq_prob`` a random
shorter one) and hold at least two, cut them at a random segment boundary into A and B, and
trim the longer side (B on ties) from a random end until ``[CLS] A [SEP] B [SEP]`` fits.

- NSP: with p = 0.5, B is a run of segments from a random start in ANOTHER document (label 1,
  NotNext) and the segments after A's cut go back to be used next; else B is what follows A
  (label 0, IsNext). The label is drawn first, so it is an exact fair coin (the reference
  forces NotNext when only one segment is gathered; here a lone trailing segment is dropped).
- SOP: A and B are always consecutive; with p = 0.5 they are swapped (label 1).
- FULL-SENTENCES: segments are packed in order into ``<s> ... </s>`` rows, crossing document
  boundaries with ``doc_sep`` between documents; a segment longer than a row is split.

Randomness: epoch e of shard s uses ``np.random.default_rng([seed, s, num_shards, e])``; its
examples are shuffled. Batch k holds examples [k B, (k + 1) B) of the endless stream of
epochs, so ``skip_batches=n`` gives exactly the stream after n consumed batches (whole epochs
are skipped by their size without being encoded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from t5x_like.errors import UserError

OBJECTIVES = ("nsp", "sop", "full_sentences")
Document = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The ids the layouts need; the vocabulary stays abstract (SentencePiece without [CLS] /
    [SEP] can lend other ids, e.g. sentinels). Pairs use ``cls`` and ``sep``; FULL-SENTENCES
    uses ``bos``, ``eos`` and ``doc_sep`` (``eos`` when None, as RoBERTa's ``</s>``)."""

    pad: int = 0
    cls: int | None = None
    sep: int | None = None
    bos: int | None = None
    eos: int | None = None
    doc_sep: int | None = None

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise UserError(f"special token id(s) {', '.join(missing)} are needed for this "
                            "objective; pass them in SpecialTokens.")


def default_corpus_documents(split: str) -> list[list[str]]:
    """The default corpus as documents: one per play, its speeches of ``split`` in order."""
    from t5x_like.data import corpus

    if split not in corpus.SPLITS:
        raise UserError(f"split {split!r} does not exist; use one of {', '.join(corpus.SPLITS)}")
    want_validation = split == "validation"
    documents = []
    for play in sorted(corpus._plays_dir().glob("*/*.md")):
        speeches = corpus.parse_play(play.read_text(encoding="utf-8"))
        kept = [s for s in speeches if corpus.is_validation(
            s, corpus.DEFAULT_VALIDATION_FRACTION) == want_validation]
        if kept:
            documents.append(kept)
    return documents


def encode_documents(documents: Iterable[Sequence[str]],
                     encode: Callable[[str], Sequence[int]]) -> list[Document]:
    """Text documents -> token documents with ``encode`` (e.g. a seqio vocabulary's encode);
    empty segments and documents are dropped."""
    out = []
    for document in documents:
        segments = [np.asarray(encode(text), np.int32) for text in document]
        segments = [s for s in segments if s.size]
        if segments:
            out.append(segments)
    return out


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's truncate_seq_pair without the per-token loop: while too long, trim the longer
    side (B on ties) by one token at the front or the back, each with p = 0.5."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    cut_a = cut_b = 0
    if len(a) > len(b):
        cut_a = min(excess, len(a) - len(b))
    else:
        cut_b = min(excess, len(b) - len(a))
    rest = excess - cut_a - cut_b  # now equal: B, A, B, A, ...
    cut_b, cut_a = cut_b + (rest + 1) // 2, cut_a + rest // 2

    def trim(x: np.ndarray, cut: int) -> np.ndarray:
        front = int(rng.binomial(cut, 0.5))
        return x[front:len(x) - (cut - front)]

    return trim(a, cut_a), trim(b, cut_b)


def pair_examples(documents: list[Document], rng: np.random.Generator, max_tokens: int,
                  short_seq_prob: float, draw_label: Callable[[np.random.Generator], int], *,
                  other_document: frozenset[int] = frozenset(),
                  swapped: frozenset[int] = frozenset()) -> list[tuple[np.ndarray, ...]]:
    """One epoch of (A, B, label) from every document, in a shuffled document order.

    BERT's gathering (walk a document, gather segments up to a target length, cut them at a
    random segment boundary into A and B), shared by NSP, SOP and StructBERT's three-way
    objective, which differ only in the label's die and what a label does: B from another
    document (the segments after A's cut go back to be used next), or A and B swapped.
    """
    def target() -> int:
        if rng.random() < short_seq_prob:
            return int(rng.integers(2, max_tokens + 1))
        return max_tokens

    examples = []
    for d in rng.permutation(len(documents)):
        document = documents[d]
        chunk, size, goal, i = [], 0, target(), 0
        while i < len(document):
            chunk.append(document[i])
            size += len(document[i])
            if (size >= goal and len(chunk) >= 2) or i == len(document) - 1:
                if len(chunk) >= 2:
                    a_end = int(rng.integers(1, len(chunk)))
                    a = np.concatenate(chunk[:a_end])
                    label = draw_label(rng)
                    if label in other_document:
                        b = _random_segments(documents, d, goal - len(a), rng)
                        i -= len(chunk) - a_end  # the unused segments come next
                    else:
                        b = np.concatenate(chunk[a_end:])
                        if label in swapped:
                            a, b = b, a
                    a, b = truncate_pair(a, b, max_tokens, rng)
                    examples.append((a, b, label))
                chunk, size, goal = [], 0, target()
            i += 1
    order = rng.permutation(len(examples))
    return [examples[j] for j in order]


def _coin(rng: np.random.Generator) -> int:
    return int(rng.random() < 0.5)


# What label 1 means: NSP's B comes from another document; SOP's A and B are swapped.
_POSITIVE_LABEL = {"nsp": {"other_document": frozenset({1})}, "sop": {"swapped": frozenset({1})}}


def _random_segments(documents: list[Document], exclude: int, want: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Segments of a random document other than ``exclude``, from a random start, until
    ``want`` tokens (or the document's end)."""
    other = int(rng.integers(len(documents) - 1))
    document = documents[other + (other >= exclude)]
    start = int(rng.integers(len(document)))
    out, size = [], 0
    for segment in document[start:]:
        out.append(segment)
        size += len(segment)
        if size >= want:
            break
    return np.concatenate(out)


def _encode_pairs(examples: list[tuple[np.ndarray, ...]], length: int,
                  special: SpecialTokens, label_name: str) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` rows, token types 0 (CLS, A, first SEP) and 1 (B, SEP)."""
    n = len(examples)
    ids = np.full((n, length), special.pad, np.int32)
    types = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    labels = np.zeros((n,), np.int32)
    for row, (a, b, label) in enumerate(examples):
        la, lb = len(a), len(b)
        ids[row, 0] = special.cls
        ids[row, 1:la + 1] = a
        ids[row, la + 1] = special.sep
        ids[row, la + 2:la + 2 + lb] = b
        ids[row, la + 2 + lb] = special.sep
        types[row, la + 2:la + 3 + lb] = 1
        mask[row, :la + 3 + lb] = 1
        labels[row] = label
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            label_name: labels}


def full_sentence_rows(documents: list[Document], length: int,
                       special: SpecialTokens) -> dict[str, np.ndarray]:
    """RoBERTa FULL-SENTENCES: whole segments packed in order into ``<s> ... </s>`` rows of
    ``length``, ``doc_sep`` between documents inside a row, the rest padding."""
    special.require("bos", "eos")
    doc_sep = special.eos if special.doc_sep is None else special.doc_sep
    capacity = length - 2
    rows, current, used = [], [], 0

    def close() -> None:
        nonlocal current, used
        if used:
            rows.append(np.concatenate([[special.bos], *current, [special.eos]]))
        current, used = [], 0

    for document in documents:
        first = True
        for segment in document:
            for piece in (segment[i:i + capacity] for i in range(0, len(segment), capacity)):
                sep = [doc_sep] if first and used else []
                if used + len(sep) + len(piece) > capacity:
                    close()
                    sep = []
                current += [np.asarray(sep, np.int32), piece]
                used += len(sep) + len(piece)
                first = False
    close()
    ids = np.full((len(rows), length), special.pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask}


def sentence_pair_batches(
    documents: list[Document],
    *,
    objective: str,
    length: int,
    batch_size: int,
    seed: int,
    special: SpecialTokens,
    shard_index: int = 0,
    num_shards: int = 1,
    skip_batches: int = 0,
    short_seq_prob: float = 0.1,
    repeat: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches for ``objective`` (``nsp``, ``sop``, ``full_sentences``): endless,
    or with ``repeat=False`` the whole batches of the first epoch only.

    Each batch: int32 ``input_ids``, ``token_type_ids``, ``attention_mask`` [batch_size,
    length], plus ``next_sentence_label`` (nsp, 1 = random B) or ``sentence_order_label``
    (sop, 1 = swapped) [batch_size], named as in transformers. Host ``shard_index`` of
    ``num_shards`` reads documents ``shard_index::num_shards`` (random B's come from its own
    shard). Mistakes (an unknown objective, too few documents or tokens) raise UserError.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"sentence-pair objective {objective!r} is unknown; use one of "
                        f"{', '.join(OBJECTIVES)}.")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"shard_index={shard_index} must be in [0, num_shards={num_shards}).")
    if batch_size < 1 or skip_batches < 0 or length < 5:
        raise UserError(f"batch_size={batch_size} must be positive, skip_batches="
                        f"{skip_batches} not negative and length={length} at least 5.")
    shard = documents[shard_index::num_shards]
    if objective == "full_sentences":
        rows = full_sentence_rows(shard, length, special)
        epoch_size = len(rows["input_ids"])

        def epoch(e: int) -> dict[str, np.ndarray]:
            order = np.random.default_rng([seed, shard_index, num_shards, e]).permutation(
                epoch_size)
            return {name: value[order] for name, value in rows.items()}
    else:
        special.require("cls", "sep")
        if len(shard) < 2 and objective == "nsp":
            raise UserError("NSP needs at least two documents per shard for random B "
                            f"segments; shard {shard_index} has {len(shard)}.")
        label = "next_sentence_label" if objective == "nsp" else "sentence_order_label"

        def examples(e: int) -> list[tuple[np.ndarray, ...]]:
            rng = np.random.default_rng([seed, shard_index, num_shards, e])
            return pair_examples(shard, rng, length - 3, short_seq_prob, _coin,
                                 **_POSITIVE_LABEL[objective])

        def epoch(e: int) -> dict[str, np.ndarray]:
            return _encode_pairs(examples(e), length, special, label)

        epoch_size = len(examples(0))
    if epoch_size == 0:
        raise UserError(f"shard {shard_index} of {num_shards} yields no {objective} examples; "
                        "pairs need documents of at least two segments. Add text or use "
                        "fewer shards.")
    if not repeat and epoch_size < batch_size:
        raise UserError(f"shard {shard_index} of {num_shards} holds {epoch_size} {objective} "
                        f"rows, fewer than one batch of {batch_size}; add text or lower "
                        "data.batch_size")
    return _batches(epoch, batch_size, skip_batches * batch_size,
                    None if objective == "full_sentences" else examples,
                    epochs=None if repeat else 1)


def _batches(epoch: Callable[[int], dict[str, np.ndarray]], batch_size: int, skip: int,
             examples: Callable[[int], list] | None, epochs: int | None
             ) -> Iterator[dict[str, np.ndarray]]:
    """Cuts the stream of epochs (``epochs`` of them, None = endless) into batches after
    dropping its first ``skip`` examples; whole skipped epochs are only counted
    (``examples`` builds without encoding)."""
    e, buffer = 0, None
    while epochs is None or e < epochs:
        if skip and examples is not None:
            count = len(examples(e))
            if count <= skip:
                skip, e = skip - count, e + 1
                continue
        data = epoch(e)
        e += 1
        size = len(data["input_ids"])
        if skip >= size:
            skip -= size
            continue
        data = {name: value[skip:] for name, value in data.items()}
        skip = 0
        buffer = data if buffer is None else {
            name: np.concatenate([buffer[name], data[name]]) for name in data}
        while len(buffer["input_ids"]) >= batch_size:
            yield {name: value[:batch_size] for name, value in buffer.items()}
            buffer = {name: value[batch_size:] for name, value in buffer.items()}
