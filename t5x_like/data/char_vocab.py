"""A character vocabulary: one id per Unicode character, for text without word boundaries.

Chinese, Japanese and other scripts written without spaces are modelled character by
character in the BERT-family papers (Chinese BERT splits every CJK character into its own
token); ``CharVocabulary`` does that for every family. Ids follow T5's conventions so the rest
of the code needs no special case: pad=0, eos=1, unk=2, the characters from 3 (most frequent
first), then ``extra_ids`` sentinels at the top like seqio's other vocabularies.

The character list is a JSON file (``{"characters": [...]}``) written by
``train_char_vocab`` from a corpus; a character not in it encodes as unk. Encoding on the
host (``encode``) and in tf.data (``encode_tf``, by binary search over the sorted code
points, no lookup-table resources) give the same ids.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from t5x_like import storage
from t5x_like.errors import UserError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SPECIAL = 3


def train_char_vocab(texts: Iterable[str], path: str | Path, *, min_count: int = 1,
                     max_chars: int = 0) -> Path:
    """Writes the characters of ``texts`` seen at least ``min_count`` times (most frequent
    first, ties by code point; at most ``max_chars``, 0 = all) to ``path`` atomically."""
    counts = collections.Counter()
    for text in texts:
        counts.update(text)
    counts.pop("\n", None)  # documents are lines: a newline never reaches the tokenizer
    chars = sorted((c for c, n in counts.items() if n >= min_count),
                   key=lambda c: (-counts[c], ord(c)))
    if max_chars:
        chars = chars[:max_chars]
    if not chars:
        raise UserError(f"no characters to build the character vocabulary {path} from")
    path = Path(path)
    storage.write_atomically(path, json.dumps({"characters": chars}, ensure_ascii=False)
                             .encode("utf-8"))
    return path


def read_characters(path: str | Path) -> tuple[str, ...]:
    """The character list of a vocabulary file, checked (one sentence on a bad file)."""
    try:
        chars = json.loads(storage.as_path(path).read_text(encoding="utf-8"))["characters"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"character vocabulary {path} is not a JSON file with a "
                        f"'characters' list ({type(e).__name__}); write one with "
                        "t5x_like.data.char_vocab.train_char_vocab") from None
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(
            chars):
        raise UserError(f"character vocabulary {path} must list distinct single characters")
    return tuple(chars)


class CharVocabulary(seqio.Vocabulary):
    """One id per character (module docstring); the file is read on first use."""

    def __init__(self, path: str | Path, extra_ids: int = 0,
                 characters: Sequence[str] | None = None):
        super().__init__(extra_ids=extra_ids)
        self.path = str(path)
        self._chars = tuple(characters) if characters is not None else None

    @property
    def characters(self) -> tuple[str, ...]:
        if self._chars is None:
            self._chars = read_characters(self.path)
        return self._chars

    @property
    def sp_model(self) -> bytes:
        """What decides the ids, for store fingerprints (``data/store.py``)."""
        return json.dumps({"characters": list(self.characters)}, ensure_ascii=False).encode()

    @property
    def _index(self) -> dict[str, int]:
        if not hasattr(self, "_index_cache"):
            self._index_cache = {c: i + NUM_SPECIAL for i, c in enumerate(self.characters)}
        return self._index_cache

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def _base_vocab_size(self) -> int:
        return NUM_SPECIAL + len(self.characters)

    def _encode(self, s: str) -> list[int]:
        index = self._index
        return [index.get(c, UNK_ID) for c in s]

    def _decode(self, ids: Iterable[int]) -> str:
        chars, top = self.characters, self._base_vocab_size
        return "".join(chars[i - NUM_SPECIAL] for i in ids if NUM_SPECIAL <= i < top)

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted code points, their ids, code point of each id - 3) as numpy constants."""
        points = np.asarray([ord(c) for c in self.characters], np.int32)
        order = np.argsort(points, kind="stable")
        return points[order], (order + NUM_SPECIAL).astype(np.int32), points

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        sorted_points, ids, _ = self._tables()
        points = tf.strings.unicode_decode(s, "UTF-8", errors="replace")
        flat = points.flat_values if isinstance(points, tf.RaggedTensor) else points
        where = tf.searchsorted(sorted_points, flat, side="left")
        where = tf.minimum(where, len(sorted_points) - 1)
        found = tf.equal(tf.gather(sorted_points, where), flat)
        out = tf.where(found, tf.gather(ids, where), UNK_ID)
        return points.with_flat_values(out) if isinstance(points, tf.RaggedTensor) else out

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        _, _, points = self._tables()
        ids = tf.ragged.boolean_mask(ids, (ids >= NUM_SPECIAL) & (ids < self._base_vocab_size))
        return tf.strings.unicode_encode(tf.gather(points, ids - NUM_SPECIAL), "UTF-8")

    def __eq__(self, other) -> bool:
        return (isinstance(other, CharVocabulary) and self.extra_ids == other.extra_ids
                and self.characters == other.characters)

    def __hash__(self) -> int:
        return hash((self.path, self.extra_ids))
