"""The embedded Shakespeare corpus and plain-text sources."""

import logging

import pytest

from t5x_like.data import corpus
from t5x_like.errors import UserError

# The real files end speech lines with two spaces (a markdown line break).
PLAY = (
    "# A Play\n"
    "\n"
    "## ACT I\n"
    "\n"
    "### SCENE I. A heath.\n"
    "\n"
    "_Enter FIRST WITCH and SECOND WITCH, with\n"
    "thunder_\n"
    "\n"
    "**FIRST WITCH**  \n"
    "When shall we meet again  \n"
    "In thunder, lightning, or in rain?\n"
    "\n"
    "**SECOND WITCH**  \n"
    "_\\[Aside]_  \n"
    "When the *hurlyburly's* done,\n"
    "\n"
    "_Thunder_\n"
    "\n"
    "When the battle's lost and won.\n"
    "\n"
    "_Exeunt_\n"
    "\n"
    "### SCENE II. A camp.\n"
    "\n"
    "**DUNCAN**  \n"
    "What bloody man is that?\n"
)


def test_parse_play_gives_one_clean_example_per_speech():
    assert corpus.parse_play(PLAY) == [
        "FIRST WITCH: When shall we meet again In thunder, lightning, or in rain?",
        # the aside and the inline markup go; the speech goes on after a stage direction
        "SECOND WITCH: When the hurlyburly's done, When the battle's lost and won.",
        "DUNCAN: What bloody man is that?",
    ]


def test_default_corpus_is_large_clean_text():
    texts = corpus.default_corpus_texts("train") + corpus.default_corpus_texts("validation")
    assert sum(len(t) for t in texts) > 1_000_000
    assert len(texts) > 25_000
    for bad in ("#", "**", "_", "\\", "[", "]"):
        assert not any(bad in t for t in texts), f"markup {bad!r} left in the corpus"
    assert all(t and t == t.strip() and "\n" not in t for t in texts)
    assert texts[0].startswith("THESEUS: Now, fair Hippolyta")  # sorted plays, first speech


def test_default_splits_are_disjoint_stable_and_small():
    train = corpus.default_corpus_texts("train")
    validation = corpus.default_corpus_texts("validation")
    assert not set(train) & set(validation)
    assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.03
    corpus._all_speeches.cache_clear()  # parse the plays again: same texts, same order
    assert corpus.default_corpus_texts("train") == train
    assert corpus.default_corpus_texts("validation") == validation
    with pytest.raises(UserError, match="split 'test'"):
        corpus.default_corpus_texts("test")


def test_read_text_source_file_and_sorted_folder(tmp_path):
    (tmp_path / "b.txt").write_text("third line\n\n  fourth line  \n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("fifth\n")
    (tmp_path / "a.txt").write_text("first\nsecond\n")
    (tmp_path / "notes.md").write_text("not read\n")
    assert list(corpus.read_text_source(tmp_path / "b.txt")) == ["third line", "fourth line"]
    assert list(corpus.read_text_source(str(tmp_path))) == [
        "first", "second", "third line", "fourth line", "fifth"]


def test_read_text_source_skips_and_counts_bad_utf8(tmp_path, caplog):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"good one\n\xff\xfe bad\nalso \xc3\x28 bad\ngood two\n")
    with caplog.at_level(logging.WARNING, logger="t5x_like.data.corpus"):
        texts = list(corpus.read_text_source(path))
    assert texts == ["good one", "good two"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "mixed.txt" in warnings[0] and "2 line(s)" in warnings[0]


def test_read_text_source_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        corpus.read_text_source(tmp_path / "missing.txt")  # fails at the call
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="contains no text"):
        list(corpus.read_text_source(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_bytes(b"\n  \n\xff\n")
    with pytest.raises(UserError, match="contains no text"):
        list(corpus.read_text_source(tmp_path / "blank.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        corpus.read_text_source(tmp_path / "folder")


def test_hash_split_is_a_pure_function_of_the_text():
    texts = [f"line number {i}" for i in range(2000)]
    validation = corpus.split_texts(texts, "validation", 0.1)
    assert 120 < len(validation) < 280  # ~10%
    assert corpus.split_texts(list(reversed(texts)), "validation", 0.1) == validation[::-1]
    assert len(corpus.split_texts(texts, "train", 0.1)) + len(validation) == len(texts)
