"""Sentence pairs for a learned metric (BLEURT-style): synthetic pairs and human ratings.

BLEURT (Sellam et al., 2020) pretrains a regression head on (reference, candidate) pairs made
by perturbing real sentences, with automatic metrics as targets, then fine-tunes it on human
ratings. Here:

- **References** are sentences of the default corpus (Shakespeare's speeches, the speaker's
  name removed, cut at ``.``/``!``/``?``) of ``MIN_WORDS``..``MAX_WORDS`` words.
- **Candidates** are perturbations of them, chosen by a seeded ``random.Random``: word
  dropping (each word with probability 0.1..0.6), span replacement (1..5 consecutive words
  replaced by words of another corpus sentence: mask-and-fill with corpus text, not with a
  model), adjacent-word swaps, one or two of these combined, an unrelated corpus sentence,
  or the reference itself. No back-translation: there is no translation model at hand.
- **Targets** are automatic signals of each pair from the maintained libraries that
  ``evaluation.metrics`` uses: sacrebleu's sentence BLEU (its defaults: exponential
  smoothing, effective order; divided by 100) and rouge-score's ROUGE-1, ROUGE-2 and ROUGE-L
  F-measures (no stemmer). The regression target is their **mean** (one number in [0, 1]);
  BERTScore is left out (it needs a second encoder pass per pair).
- **Ratings** are a TSV of ``reference<TAB>candidate<TAB>score[<TAB>split]`` (a header line is
  allowed); without a split column, a stable hash of the pair puts ``VALIDATION_FRACTION``
  of the rows in validation. A missing or non-UTF-8 file, or a row with the wrong number of
  fields, an empty side or a score that is not a finite number, stops with one sentence.

Everything is a pure function of its arguments: the same seed gives the same pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

from t5x_like.errors import UserError

MIN_WORDS, MAX_WORDS = 5, 30
SIGNALS = ("bleu", "rouge1", "rouge2", "rougeL")
VALIDATION_FRACTION = 0.1
# How a candidate is made, with its probability.
PERTURBATIONS = {"drop": 0.25, "span": 0.25, "swap": 0.1, "combined": 0.25, "unrelated": 0.1,
                 "copy": 0.05}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclasses.dataclass(frozen=True)
class Pair:
    """A (reference, candidate) pair with its score (a target or a human rating)."""

    reference: str
    candidate: str
    score: float


# --------------------------------------------------------------------------- rows


def pair_lengths(inputs_length: int) -> tuple[int, int]:
    """Most tokens kept of the reference and of the candidate in a row of ``inputs_length``
    ``[CLS] reference [SEP] candidate [SEP]``: half each, so neither side is cut away."""
    if inputs_length < 5:
        raise UserError(f"data.inputs_length={inputs_length} cannot hold [CLS] reference [SEP] "
                        "candidate [SEP]; use at least 5")
    first = (inputs_length - 3) // 2
    return first, inputs_length - 3 - first


# --------------------------------------------------------------------------- references


def corpus_sentences(texts: Sequence[str]) -> list[str]:
    """Sentences of ``MIN_WORDS``..``MAX_WORDS`` words from speeches ("SPEAKER: text"), in
    order, duplicates dropped."""
    seen: set[str] = set()
    out = []
    for text in texts:
        _, sep, body = text.partition(": ")
        for sentence in _SENTENCE_END.split((body if sep else text).strip()):
            sentence = " ".join(sentence.split())
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


# --------------------------------------------------------------------------- perturbations


def drop_words(words: list[str], rng: random.Random) -> list[str]:
    """Each word dropped with one probability drawn from [0.1, 0.6]; one word always stays."""
    p = rng.uniform(0.1, 0.6)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def replace_span(words: list[str], filler: list[str], rng: random.Random) -> list[str]:
    """1..5 consecutive words replaced by as many consecutive words of ``filler`` (all of
    it where ``filler`` is shorter)."""
    n = rng.randint(1, min(5, len(words)))
    start = rng.randint(0, len(words) - n)
    f_start = rng.randint(0, max(0, len(filler) - n))
    return words[:start] + filler[f_start:f_start + n] + words[start + n:]


def swap_words(words: list[str], rng: random.Random) -> list[str]:
    """1..3 swaps of two adjacent words."""
    out = list(words)
    for _ in range(rng.randint(1, 3)):
        if len(out) < 2:
            break
        i = rng.randint(0, len(out) - 2)
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def perturb(reference: str, others: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """(candidate, the perturbation's name) for ``reference``; ``others`` are the corpus
    sentences that span replacement and unrelated candidates draw from."""
    kinds, weights = zip(*PERTURBATIONS.items(), strict=True)
    kind = rng.choices(kinds, weights)[0]
    words = reference.split()
    if kind == "copy":
        return reference, kind
    if kind == "unrelated":
        return rng.choice(others), kind
    steps = [kind] if kind != "combined" else rng.sample(["drop", "span", "swap"], 2)
    for step in steps:
        if step == "drop":
            words = drop_words(words, rng)
        elif step == "span":
            words = replace_span(words, rng.choice(others).split(), rng)
        else:
            words = swap_words(words, rng)
    return " ".join(words), kind


# --------------------------------------------------------------------------- targets


def sentence_bleu(reference: str, candidate: str) -> float:
    """sacrebleu's sentence BLEU of ``candidate`` against ``reference`` (0..100, its defaults:
    exponential smoothing, effective order)."""
    import sacrebleu

    return sacrebleu.sentence_bleu(candidate, [reference]).score


@functools.lru_cache(maxsize=4)
def _rouge_scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=False)


def rouge_fmeasures(reference: str, candidate: str,
                    types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """rouge-score's F-measure of each ROUGE type (no stemmer), {type: 0..1}."""
    scores = _rouge_scorer(tuple(types)).score(reference, candidate)  # (target, prediction)
    return {k: float(scores[k].fmeasure) for k in types}


def signals(reference: str, candidate: str) -> dict[str, float]:
    """{"bleu": sacrebleu sentence BLEU / 100, "rouge1"/"rouge2"/"rougeL": F-measures}."""
    return {"bleu": sentence_bleu(reference, candidate) / 100.0,
            **rouge_fmeasures(reference, candidate, SIGNALS[1:])}


def target(values: dict[str, float]) -> float:
    """The regression target: the mean of the signals."""
    return sum(values[k] for k in SIGNALS) / len(SIGNALS)


def synthetic_pairs(texts: Sequence[str], *, num_pairs: int, seed: int) -> list[Pair]:
    """``num_pairs`` perturbed pairs of the corpus ``texts`` with their targets; the same
    arguments give the same pairs."""
    sentences = corpus_sentences(texts)
    if len(sentences) < 2:
        raise UserError(f"synthetic metric pairs need at least 2 sentences of {MIN_WORDS}.."
                        f"{MAX_WORDS} words; the texts hold {len(sentences)}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        reference = rng.choice(sentences)
        candidate, _ = perturb(reference, sentences, rng)
        pairs.append(Pair(reference, candidate, target(signals(reference, candidate))))
    return pairs


# --------------------------------------------------------------------------- ratings files


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file; a missing file, a folder or other bytes stop with one
    sentence that names ``what`` the file was meant to be."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (line {line}: byte "
                        f"{e.object[e.start]:#04x}); save it as UTF-8") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _hash_split(reference: str, candidate: str) -> str:
    """A stable train/validation split of a pair: ``VALIDATION_FRACTION`` of the pairs,
    by the SHA-256 of the pair."""
    digest = hashlib.sha256(f"{reference}\t{candidate}".encode()).digest()
    value = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if value < VALIDATION_FRACTION else "train"


def _rating_row(fields: list[str], where: str, line: str) -> tuple[str, Pair]:
    """(split, pair) of one TSV row's fields; a UserError names the row ``where`` and why."""
    if len(fields) not in (3, 4) or not _is_number(fields[2]):
        raise UserError(f"{where} must read reference<TAB>candidate<TAB>score[<TAB>split], got "
                        f"{len(fields)} field(s): {line[:80]!r}")
    reference, candidate, score = fields[0].strip(), fields[1].strip(), float(fields[2])
    if not (reference and candidate):
        raise UserError(f"{where} has an empty {'reference' if not reference else 'candidate'}:"
                        f" {line[:80]!r}")
    if not math.isfinite(score):
        raise UserError(f"{where} has score {fields[2].strip()!r}; a rating must be a finite "
                        "number")
    split = fields[3].strip() if len(fields) == 4 else _hash_split(reference, candidate)
    if not split:
        raise UserError(f"{where} has an empty split column; name the split or drop the column")
    return split, Pair(reference, candidate, score)


def read_ratings(path: str | Path) -> dict[str, list[Pair]]:
    """{split: pairs} of a ratings TSV (see the module docstring); a UserError names the first
    bad line."""
    out: dict[str, list[Pair]] = {}
    for number, line in enumerate(read_utf8(path, "ratings file").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if number == 1 and len(fields) >= 3 and not _is_number(fields[2]):
            continue  # a header
        split, pair = _rating_row(fields, f"{path}:{number}", line)
        out.setdefault(split, []).append(pair)
    if not out:
        raise UserError(f"ratings file {path} holds no rows")
    return out


def write_ratings(path: str | Path, pairs: Sequence[Pair], split: str | None = None) -> Path:
    """Writes ``pairs`` as a ratings TSV (with a split column when ``split`` is given)."""
    path = Path(path)
    rows = ["reference\tcandidate\tscore" + ("\tsplit" if split else "")]
    for i, p in enumerate(pairs):
        if "\t" in p.reference + p.candidate or "\n" in p.reference + p.candidate:
            raise UserError(f"pair {i} holds a tab or newline, which a TSV cannot keep: "
                            f"{p.reference[:40]!r} / {p.candidate[:40]!r}")
        rows.append(f"{p.reference}\t{p.candidate}\t{p.score:.6g}" + (f"\t{split}" if split
                                                                       else ""))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
