"""SentencePiece vocabularies with T5's ids: training, caching, the default 8k one."""

import os
import threading
from pathlib import Path

import pytest
import sentencepiece as spm

# The default vocabulary is trained once per machine into this cache and reused (the same
# place tests/conftest.py points at); tests that train anything else use tmp_path.
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("T5X_LIKE_CACHE", str(ROOT / ".cache" / "t5x_like"))

from t5x_like.data import corpus, vocab  # noqa: E402
from t5x_like.errors import UserError  # noqa: E402

SMALL_TEXTS = corpus.default_corpus_texts("train")[:1500]


def test_train_vocab_uses_t5_ids_and_is_deterministic(tmp_path):
    first = vocab.train_vocab(iter(SMALL_TEXTS), tmp_path / "a" / "small.model", vocab_size=600)
    second = vocab.train_vocab(SMALL_TEXTS, tmp_path / "small2.model", vocab_size=600)
    assert first == tmp_path / "a" / "small.model"
    assert first.read_bytes() == second.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(first))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 600
    text = "Zounds! ∑ 😀 quoth Ægeus"  # characters never seen: bytes, not <unk>
    ids = sp.encode(text)
    assert 2 not in ids and sp.decode(ids) == text
    assert not list(tmp_path.glob("**/*.tmp"))  # the temp file was renamed into place


def test_train_vocab_too_large_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="with 50000 pieces: .*Vocabulary size too high"):
        vocab.train_vocab(["tiny corpus"] * 10, tmp_path / "x.model", vocab_size=50000)
    assert not (tmp_path / "x.model").exists()


def test_default_vocab_path_follows_the_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("T5X_LIKE_CACHE", str(tmp_path))
    assert vocab.default_vocab_path() == tmp_path / "shakespeare_sp8000.model"
    assert vocab.default_vocab_path(32000) == tmp_path / "shakespeare_sp32000.model"
    monkeypatch.delenv("T5X_LIKE_CACHE")
    assert vocab.default_vocab_path() == Path.home() / ".cache/t5x_like/shakespeare_sp8000.model"


def test_racing_processes_train_the_default_once(monkeypatch, tmp_path):
    monkeypatch.setenv("T5X_LIKE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "default_corpus_texts", lambda split: SMALL_TEXTS)
    calls = []
    real_train = vocab.train_vocab

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(vocab, "train_vocab", counting_train)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(vocab.ensure_default_vocab(500)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert paths == [tmp_path / "shakespeare_sp500.model"] * 3
    assert spm.SentencePieceProcessor(model_file=str(paths[0])).get_piece_size() == 500


def test_default_vocabulary_sizes_sentinels_and_round_trip():
    v = vocab.get_vocabulary()
    assert v.vocab_size == 8100  # 8000 pieces + 100 extra ids
    assert (v.tokenizer.pad_id(), v.eos_id, v.unk_id) == (0, 1, 2)
    assert v.encode("<extra_id_0>") == [8099] and v.encode("<extra_id_99>") == [8000]
    held_out = corpus.default_corpus_texts("validation")
    ids = [v.encode(t) for t in held_out]
    assert all(0 < i < 8000 for seq in ids for i in seq)  # no pad, eos or sentinels
    assert [v.decode(seq) for seq in ids] == held_out
    chars = sum(len(t) for t in held_out)
    assert chars / sum(len(seq) for seq in ids) > 3.0  # a real vocabulary, not bytes


def test_get_vocabulary_rejects_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        vocab.get_vocabulary(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        vocab.get_vocabulary(tmp_path / "junk.model")
    explicit = vocab.get_vocabulary(vocab.ensure_default_vocab(), extra_ids=10)
    assert explicit.vocab_size == 8010


def test_lazy_default_vocabulary_trains_on_first_use(monkeypatch, tmp_path):
    trained = vocab.ensure_default_vocab()  # the real one, from the shared cache
    monkeypatch.setenv("T5X_LIKE_CACHE", str(tmp_path))
    calls = []

    def fake_ensure(vocab_size=vocab.DEFAULT_VOCAB_SIZE):
        calls.append(vocab_size)
        vocab.default_vocab_path(vocab_size).write_bytes(trained.read_bytes())
        return vocab.default_vocab_path(vocab_size)

    monkeypatch.setattr(vocab, "ensure_default_vocab", fake_ensure)
    lazy = vocab.lazy_default_vocabulary()
    assert calls == [] and not vocab.default_vocab_path().exists()  # creating trains nothing
    assert lazy.eos_id == 1 and lazy.vocab_size == 8100
    assert calls == [8000]
    assert lazy == vocab.get_vocabulary()  # seqio sees one vocabulary, lazy or not
