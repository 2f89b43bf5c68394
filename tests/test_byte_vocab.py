"""Byte- and character-level text (``data.vocab_kind``): ids against transformers' ByT5
tokenizer and Python's own UTF-8, host and tf.data encodings equal, every family's config
built on bytes, and a Chinese text task (tests/data/chinese, written for this test) trained
character by character with falling loss.
"""

from __future__ import annotations

import os
from pathlib import Path

import family_runs
import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

from t5x_like import config as config_lib
from t5x_like.data.char_vocab import CharVocabulary, train_char_vocab
from t5x_like.data.special_tokens import special_tokens
from t5x_like.data.vocab import get_vocabulary
from t5x_like.errors import UserError

CHINESE = ROOT / "tests" / "data" / "chinese" / "essays.txt"
MIXED = ["汉字很有意思。", "Byte-level: café, naïve, 😀!", "", "春眠不觉晓"]


def test_byte_vocabulary_matches_byt5_and_utf8():
    from transformers import ByT5Tokenizer

    vocab = get_vocabulary(None, kind="byte")
    byt5 = ByT5Tokenizer(extra_ids=100)
    for text in MIXED:
        ids = list(vocab.encode(text))
        assert ids == [b + 3 for b in text.encode("utf-8")]
        assert ids == byt5(text, add_special_tokens=False)["input_ids"]
        assert vocab.decode(ids) == text
        assert list(vocab.encode_tf(tf.constant(text)).numpy()) == ids
    assert vocab.vocab_size == 259 + 100 == len(byt5)
    ids = special_tokens(vocab)
    assert (ids.pad, ids.eos, ids.unk, ids.ordinary) == (0, 1, 2, (3, 259))
    assert ids.mask == vocab.vocab_size - 1  # borrowed sentinels, as with SentencePiece
    with pytest.raises(UserError, match="needs no vocabulary file"):
        get_vocabulary("some.model", kind="byte")
    with pytest.raises(UserError, match="vocab_kind"):
        get_vocabulary(None, kind="wordpiece")


def test_char_vocabulary_host_and_tf_encodings_agree(tmp_path):
    path = train_char_vocab(CHINESE.read_text("utf-8").splitlines(), tmp_path / "zh.json")
    vocab = CharVocabulary(path, extra_ids=100)
    text = CHINESE.read_text("utf-8")
    chars = set(text) - {"\n"}
    assert vocab.vocab_size == 3 + len(chars) + 100
    counts = {c: text.count(c) for c in chars}
    assert vocab.encode("，")[0] == 3 == min(vocab.encode(max(counts, key=counts.get)))
    for line in text.splitlines()[:5] + ["未见过的字：龘 😀 x"]:
        ids = list(vocab.encode(line))
        assert len(ids) == len(line)  # one id per character, whatever its UTF-8 length
        assert list(vocab.encode_tf(tf.constant(line)).numpy()) == ids
        known = "".join(c for c in line if c in chars)
        assert vocab.decode(ids) == known  # unknown characters decode to nothing
        assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == known
    assert vocab.encode("龘") == [2]
    batch = tf.constant([vocab.encode("春天来了") + [1, 0], vocab.encode("小河") + [0] * 4])
    assert [s.decode() for s in vocab.decode_tf(batch).numpy()] == ["春天来了", "小河"]
    assert vocab == CharVocabulary(path, extra_ids=100)
    assert vocab != CharVocabulary(path, extra_ids=10)
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(UserError, match="characters"):
        get_vocabulary(bad, kind="char")


# Families whose shipped configs read a token stream: each builds on the byte vocabulary
# and traces one loss on a real batch of shakespeare_bytes.
WHOLE_WORD = ("bert_mlm_nsp", "albert_sop", "spanbert")
# -m slow: the default run trains GPT on characters (below) instead.
STREAM_CONFIGS = [
    pytest.param(n, marks=pytest.mark.slow) for n in
    ("t5_span_corruption", "gpt_lm", "bart_denoise", "roberta_mlm", "electra_rtd", "xlnet_plm",
     "mass", "unilm", "bert_mlm_nsp", "albert_sop", "spanbert")]


@pytest.mark.parametrize("name", STREAM_CONFIGS)
def test_every_stream_family_builds_and_traces_on_bytes(name):
    from t5x_like.experiment import build

    os.chdir(ROOT)
    # whole-word masking reads SentencePiece pieces (families/bert.py), so it is off here
    extra = ["objective.whole_word=False"] if name in WHOLE_WORD else []
    config = config_lib.load_config(
        f"configs/{name}.py:tiny",
        ["data.vocab_kind=byte", "data.task=shakespeare_bytes", "data.batch_size=2",
         "data.inputs_length=32", *extra])
    exp = build(config)
    assert exp.vocabulary.vocab_size == 359 and exp.config.model.get("vocab_size", 384) == 384
    batch = next(exp.family.batches(split="train", batch_size=2, shuffle=False, repeat=True,
                                    skip_batches=0, shard_index=0, num_shards=1))
    ints = [v for v in batch.values() if np.issubdtype(v.dtype, np.integer) and v.ndim == 2]
    assert ints and all(int(np.max(v)) < 359 for v in ints)  # bytes and sentinels only
    params = jax.eval_shape(exp.family.init, jax.random.key(0))
    key = jax.random.key(1)
    loss, _ = jax.eval_shape(lambda p, b: exp.family.loss_fn(p, exp.family.features(b, key),
                                                             key), params, batch)
    assert loss.shape == ()


def test_default_task_with_another_vocabulary_kind_is_one_sentence():
    os.chdir(ROOT)
    with pytest.raises(UserError, match="shakespeare_bytes"):
        config_lib.load_config("configs/gpt_lm.py:tiny", ["data.vocab_kind=byte"])


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_whole_word_masking_on_bytes_or_characters_is_one_sentence(kind):
    from t5x_like.families.bert import word_starts_of

    with pytest.raises(UserError, match="objective.whole_word=False"):
        word_starts_of(get_vocabulary(None, kind=kind))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    yield from family_runs.compilation_cache_env(tmp_path_factory)


def register_chinese_task(vocab_path: Path) -> str:
    from t5x_like.tasks import register_text_task

    name = "chinese_essays_chars"
    register_text_task(name, str(CHINESE), vocabulary=get_vocabulary(vocab_path, kind="char"),
                       validation_fraction=0.25)
    return name


def test_chinese_text_trains_character_by_character(tmp_path, compilation_cache):
    """GPT on the Chinese essays, one id per character: the loss falls over 20 steps and the
    eval batch's cross-entropy is finite; the batches decode back to the file's text."""
    from t5x_like.experiment import build
    from t5x_like.train import train

    vocab_path = train_char_vocab(CHINESE.read_text("utf-8").splitlines(),
                                  tmp_path / "zh_chars.json")
    task = register_chinese_task(vocab_path)
    os.chdir(ROOT)
    config = config_lib.load_config("configs/gpt_lm.py:tiny", [
        "data.vocab_kind=char", f"data.vocab_path={vocab_path}", f"data.task={task}",
        "model.d_model=32", "model.num_heads=4", "model.d_kv=8", "model.d_ff=64",
        "model.num_layers=1", *family_runs.RUN, "optimizer.learning_rate=0.01"])
    exp = build(config)
    batch = next(exp.family.batches(split="train", batch_size=8, shuffle=False, repeat=True,
                                    skip_batches=0, shard_index=0, num_shards=1))
    row = batch["tokens"][0].tolist()
    text = exp.vocabulary.decode(row[: row.index(1)] if 1 in row else row)
    assert len(text) > 10 and text in CHINESE.read_text("utf-8")
    result = train(config, tmp_path / "run")
    losses = family_runs.logged_losses(tmp_path / "run")
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(16, 21)])
    assert last < first - 0.5, (first, last)  # chance: ln(3 + ~560 characters + 100) = 6.5
    assert np.isfinite(result["eval/loss"])
