"""ERNIE's knowledge units on the host: a lexicon of multi-word entities and phrases, found in
token rows by longest match, turned into the ``unit_starts`` the device masks whole.

The lexicon file is UTF-8 text, one unit a line: ``KIND<TAB>surface text`` with KIND
``entity`` or ``phrase``; ``#`` starts a comment. A unit matches where its words' tokens occur
at a word start and end before one; it is also tried with its first letter's case flipped
(``My lord`` / ``my lord``).

The default lexicon (``ernie_shakespeare.tsv`` beside this file) is ``derive_lexicon`` over
the default corpus's train speeches, reproducible with ``python -m t5x_like.data.lexicon``:

- entities: the plays' character names of two or more words (``MARK ANTONY``, ``SIR TOBY
  BELCH``, ``First Lord``) that speak at least ``MIN_SPEECHES`` times, as the corpus writes
  them before each speech, and their title-case form (``Mark Antony``) where that occurs
  at least ``MIN_SPEECHES`` times inside the speeches;
- phrases: word bigrams and trigrams inside a clause (no punctuation between the words) seen
  at least ``MIN_COUNT`` times, with pointwise mutual information ln p(w1..wn) / prod p(wi)
  of at least ``MIN_PMI`` (the collocations: ``my lord``, ``I pray you``, ``thou art``), in
  their most frequent casing.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from t5x_like.errors import UserError

KINDS = ("phrase", "entity")  # in the order ERNIE 1.0's stages add them
DEFAULT_LEXICON = Path(__file__).with_name("ernie_shakespeare.tsv")
MIN_SPEECHES = 3
MIN_COUNT = 20
MIN_PMI = 3.0
_SPEAKER = re.compile(r"^([^:]{1,40}): (.*)$", re.S)
_CLAUSES = re.compile(r"[^A-Za-z' ]+")


# --------------------------------------------------------------------------- the file


def read_lexicon(path: str | Path) -> list[tuple[str, str]]:
    """[(kind, text)] from a lexicon file (module docstring); bad lines are one sentence."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"objective.lexicon={str(path)!r} is not a file; give a lexicon of "
                        "'entity<TAB>text' / 'phrase<TAB>text' lines, or '' for the default")
    units = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        kind, _, text = line.partition("\t")
        if kind not in KINDS or not text.strip():
            raise UserError(f"{path}:{number}: expected 'entity<TAB>text' or 'phrase<TAB>text', "
                            f"got {line!r}")
        units.append((kind, " ".join(text.split())))
    if not units:
        raise UserError(f"lexicon {path} holds no units")
    return units


def write_lexicon(units: Sequence[tuple[str, str]], path: str | Path) -> None:
    header = "# ERNIE knowledge units: kind<TAB>text (t5x_like/data/lexicon.py says how)\n"
    Path(path).write_text(header + "".join(f"{k}\t{t}\n" for k, t in units), encoding="utf-8")


# --------------------------------------------------------------------------- deriving one


def derive_lexicon(speeches: Iterable[str]) -> list[tuple[str, str]]:
    """Entities and phrases of ``speeches`` (``SPEAKER: text`` lines), as the module says;
    entities first, each kind sorted by frequency then text."""
    speakers: collections.Counter = collections.Counter()
    bodies = []
    for speech in speeches:
        match = _SPEAKER.match(speech)
        if match:
            speakers[match.group(1)] += 1
        bodies.append(match.group(2) if match else speech)
    names = {s: n for s, n in speakers.items() if len(s.split()) >= 2 and n >= MIN_SPEECHES}
    titled = {tuple(n.title().split()) for n in names if n.title() != n}
    sizes = sorted({len(t) for t in titled})
    said: collections.Counter = collections.Counter()  # title-case names inside the speeches
    for body in bodies:
        tokens = re.findall(r"[A-Za-z']+", body)
        for n in sizes:
            grams = zip(*(tokens[i:] for i in range(n)), strict=False)
            said.update(g for g in grams if g in titled)
    entities = dict(names)
    entities.update({" ".join(t): c for t, c in said.items() if c >= MIN_SPEECHES})
    words: collections.Counter = collections.Counter()
    grams: collections.Counter = collections.Counter()
    surface: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for body in bodies:
        for clause in _CLAUSES.split(body):
            raw = [w for w in clause.split() if w.strip("'")]
            low = [w.lower() for w in raw]
            words.update(low)
            for n in (2, 3):
                for i in range(len(low) - n + 1):
                    gram = tuple(low[i:i + n])
                    grams[gram] += 1
                    surface[gram][" ".join(raw[i:i + n])] += 1
    total = sum(words.values())
    phrases = {}
    for gram, count in grams.items():
        if count < MIN_COUNT:
            continue
        pmi = math.log(count * total ** (len(gram) - 1) / math.prod(words[w] for w in gram))
        if pmi >= MIN_PMI:
            best = max(surface[gram].items(), key=lambda kv: (kv[1], kv[0]))[0]
            phrases[best] = count
    order = lambda d: sorted(d, key=lambda k: (-d[k], k))  # noqa: E731
    return [("entity", e) for e in order(entities)] + [("phrase", p) for p in order(phrases)]


# --------------------------------------------------------------------------- matching


class LexiconMatcher:
    """Longest match of lexicon units in token rows (greedy, left to right, at word starts).

    ``units``: [(kind, text)]; ``encode``: text -> token ids (the run's vocabulary);
    ``word_starts``: bool [vocab], which ids open a word.
    """

    def __init__(self, units: Sequence[tuple[str, str]], encode, word_starts: np.ndarray):
        self.word_starts = np.asarray(word_starts, bool)
        self.by_first: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        for kind, text in units:
            variants = {text, text[:1].swapcase() + text[1:]}
            for variant in variants:
                ids = tuple(int(i) for i in encode(variant))
                if len(ids) < 2 or not self.word_starts[ids[0]]:
                    continue  # one piece is already a whole word; a unit opens a word
                self.by_first.setdefault(ids[0], []).append((ids, KINDS.index(kind)))
        for first in self.by_first:  # longest first, then the entity over the phrase
            self.by_first[first].sort(key=lambda u: (-len(u[0]), -u[1]))
        self._firsts = np.array(sorted(self.by_first), np.int64)

    def kinds(self, row: np.ndarray) -> np.ndarray:
        """int8 [L]: per position the kind index of the unit covering it (0 phrase, 1 entity)
        and -1 outside units; each unit's first position holds ``2 + kind`` instead."""
        row = np.asarray(row)
        length = len(row)
        out = np.full(length, -1, np.int8)
        starts = self.word_starts[row]
        values = row.tolist()
        taken = 0  # positions before this are inside an earlier match
        for i in np.flatnonzero(np.isin(row, self._firsts)).tolist():
            if i < taken:
                continue
            for ids, kind in self.by_first[values[i]]:
                end = i + len(ids)
                if (end <= length and tuple(values[i:end]) == ids
                        and (end == length or starts[end])):
                    out[i], out[i + 1:end] = 2 + kind, kind
                    taken = end
                    break
        return out


def unit_starts(word_starts: np.ndarray, kinds: np.ndarray, level: int) -> np.ndarray:
    """bool [..., L]: where a masking unit opens at stage ``level`` (0 basic: words; 1: words and
    phrases; 2: words, phrases and entities): inside a unit of an included kind, only its first
    position opens one."""
    inside = (kinds >= 0) & (kinds < 2) & (kinds < level)
    return np.asarray(word_starts, bool) & ~inside


if __name__ == "__main__":  # regenerate the shipped default lexicon from the corpus
    from t5x_like.data import corpus

    write_lexicon(derive_lexicon(corpus.default_corpus_texts("train")), DEFAULT_LEXICON)
    print(f"wrote {DEFAULT_LEXICON}")
