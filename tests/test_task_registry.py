"""The text-to-text registry: T5's prefixes on TFDS mock data, label words and back, sizes, rates.

Expected strings are written here from T5's formats (t5/data/preprocessors.py ``glue``,
``stsb``, ``wsc``, ``record``, ``squad``) and label words from TFDS's own builder configs, so
the task code is checked against outside spellings, not against itself.
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("T5X_LIKE_CACHE", str(ROOT / ".cache" / "t5x_like"))

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from t5x_like import tasks  # noqa: E402
from t5x_like.data.vocab import get_vocabulary  # noqa: E402
from t5x_like.errors import UserError  # noqa: E402
from t5x_like.tasks import glue, superglue, text_to_text  # noqa: E402

EOS = 1
LENGTHS = {"inputs": 1024, "targets": 128}


def _s(b) -> str:
    return b.decode() if isinstance(b, bytes) else b


def _labels(tfds_name: str) -> list[str]:
    return list(tfds.builder(tfds_name).builder_config.label_classes)


# task -> (TFDS builder, split read, expected (inputs, targets) from a raw example)
def _glue(fmt, name):
    return lambda x: (fmt.format(**{k: _s(v) for k, v in x.items() if isinstance(v, bytes)}),
                      _labels(f"glue/{name}")[x["label"]])


def _sg(fmt, name):
    return lambda x: (fmt.format(**{k: _s(v) for k, v in x.items() if isinstance(v, bytes)}),
                      _labels(f"super_glue/{name}")[x["label"]])


def _multirc(x):
    text = f"multirc question: {_s(x['question'])} answer: {_s(x['answer'])} " \
           f"paragraph: {_s(x['paragraph'])}"
    text = re.sub("<(/)?b>", "", text.replace("<br>", " "))
    return text, ["False", "True"][x["label"]]


def _squad(x):
    def pad(t):
        return re.sub(r"\s+", " ", re.sub(r"([!-/:-@\[-`{-~])", r" \1 ", t))

    text = f"question: {pad(_s(x['question']))} context: {pad(_s(x['context']))}"
    return re.sub(r"\s+", " ", text), pad(_s(x["answers"]["text"][0]))


EXPECTED = {
    "glue_cola": ("glue/cola", "validation", _glue("cola sentence: {sentence}", "cola")),
    "glue_sst2": ("glue/sst2", "validation", _glue("sst2 sentence: {sentence}", "sst2")),
    "glue_mrpc": ("glue/mrpc", "validation",
                  _glue("mrpc sentence1: {sentence1} sentence2: {sentence2}", "mrpc")),
    "glue_qqp": ("glue/qqp", "validation",
                 _glue("qqp question1: {question1} question2: {question2}", "qqp")),
    "glue_stsb": ("glue/stsb", "validation", lambda x: (
        f"stsb sentence1: {_s(x['sentence1'])} sentence2: {_s(x['sentence2'])}",
        f"{round(float(x['label']) * 5) / 5:.1f}")),
    "glue_mnli": ("glue/mnli", "validation_matched",
                  _glue("mnli hypothesis: {hypothesis} premise: {premise}", "mnli")),
    "glue_mnli_mismatched": ("glue/mnli_mismatched", "validation",
                             _glue("mnli hypothesis: {hypothesis} premise: {premise}", "mnli")),
    "glue_qnli": ("glue/qnli", "validation",
                  _glue("qnli question: {question} sentence: {sentence}", "qnli")),
    "glue_rte": ("glue/rte", "validation",
                 _glue("rte sentence1: {sentence1} sentence2: {sentence2}", "rte")),
    "glue_wnli": ("glue/wnli", "validation",
                  _glue("wnli sentence1: {sentence1} sentence2: {sentence2}", "wnli")),
    "super_glue_boolq": ("super_glue/boolq", "validation",
                         _sg("boolq passage: {passage} question: {question}", "boolq")),
    "super_glue_cb": ("super_glue/cb", "validation",
                      _sg("cb hypothesis: {hypothesis} premise: {premise}", "cb")),
    "super_glue_copa": ("super_glue/copa", "validation", _sg(
        "copa choice1: {choice1} choice2: {choice2} premise: {premise} question: {question}",
        "copa")),
    "super_glue_rte": ("super_glue/rte", "validation",
                       _sg("rte hypothesis: {hypothesis} premise: {premise}", "rte")),
    "super_glue_wic": ("super_glue/wic", "validation", _sg(
        "wic sentence1: {sentence1} sentence2: {sentence2} word: {word}", "wic")),
    "super_glue_multirc": ("super_glue/multirc", "validation", _multirc),
    # mock spans point past the mock text, so nothing is marked (as T5's regex would not)
    "super_glue_wsc": ("super_glue/wsc.fixed", "validation", lambda x: (
        f"wsc text: {_s(x['text'])}", ["False", "True"][x["label"]])),
    "squad_v1": ("squad/v1.1", "validation", _squad),
    "cnn_dailymail": ("cnn_dailymail", "validation",
                      lambda x: (f"summarize: {_s(x['article'])}", _s(x["highlights"]))),
    "wmt14_ende": ("wmt14_translate/de-en", "validation",
                   lambda x: (f"translate English to German: {_s(x['en'])}", _s(x["de"]))),
}


def _processed(task_name, split="validation"):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, num_epochs=1,
                          try_in_mem_cache=False)
    return list(ds.as_numpy_iterator())


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("task_name", sorted(EXPECTED))
def test_task_yields_t5_prefixed_examples(task_name, mock):
    builder, tfds_split, expect = EXPECTED[task_name]
    raw = list(tfds.as_numpy(tfds.load(builder, split=tfds_split, shuffle_files=False)))
    out = _processed(task_name)
    assert len(out) == len(raw) == 4
    vocab = get_vocabulary()
    for ex, x in zip(out, raw, strict=True):
        inputs, targets = expect(x)
        assert _s(ex["inputs_pretokenized"]) == inputs
        assert _s(ex["targets_pretokenized"]) == targets
        # tokens: EOS-terminated, and they decode back to the text (SentencePiece folds spaces)
        for key, text in (("inputs", inputs), ("targets", targets)):
            assert ex[key][-1] == EOS and ex[key].dtype == np.int32
            assert vocab.decode(ex[key][:-1].tolist()) == " ".join(text.split())


def test_record_writes_one_example_per_answer(mock):
    raw = list(tfds.as_numpy(tfds.load("super_glue/record", split="validation")))
    out = _processed("super_glue_record")
    assert len(out) == sum(max(1, len(x["answers"])) for x in raw)
    first = raw[0]
    passage = re.sub(r"\n@highlight\n", ". ",
                     re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", _s(first["passage"])))
    inputs = (f"record query: {_s(first['query'])} entities: "
              f"{', '.join(_s(e) for e in first['entities'])} passage: {passage}")
    answers = [_s(a) for a in first["answers"]]
    head = out[: len(answers)]
    assert [_s(ex["inputs_pretokenized"]) for ex in head] == [inputs] * len(answers)
    assert [_s(ex["targets_pretokenized"]) for ex in head] == answers
    task = seqio.get_mixture_or_task("super_glue_record")
    target = task.postprocess_fn(head[0]["targets_pretokenized"], example=head[0],
                                 is_target=True)
    assert target == {"value": answers, "group": (int(first["idx"]["passage"]),
                                                  int(first["idx"]["query"]))}


def _one(fn, example):
    ds = tf.data.Dataset.from_tensors(example)
    return next(fn(ds).as_numpy_iterator())


def test_wsc_marks_noun_and_pronoun_as_t5_docstring():
    """T5's ``wsc`` docstring: 'This is a test sentence .' with span1 'test' (word 3) and
    span2 'This' (word 0) -> 'wsc text: # This # is a * test * sentence .' -> 'False'."""
    ex = {"text": "This is a test sentence .", "span1_text": "test", "span1_index": 3,
          "span2_text": "This", "span2_index": 0, "label": 0, "idx": 7}
    out = _one(lambda ds: ds.map(superglue.wsc_example), ex)
    assert _s(out["inputs"]) == "wsc text: # This # is a * test * sentence ."
    assert _s(out["targets"]) == "False"
    ex.update(text="The trophy would not fit in the brown suitcase because it was too big .",
              span1_text="the brown suitcase", span1_index=6, span2_text="it", span2_index=10,
              label=1)
    out = _one(lambda ds: ds.map(superglue.wsc_example), ex)
    assert _s(out["inputs"]) == ("wsc text: The trophy would not fit in * the brown suitcase * "
                                 "because # it # was too big .")
    assert _s(out["targets"]) == "True"


def test_record_and_multirc_hand_examples():
    """T5's ``record`` docstring example, with highlights; MultiRC's HTML markup removed."""
    ex = {"passage": "This is the passage.\n@highlight\nA bird\n@highlight\nsings",
          "query": "A @placeholder is a bird.", "entities": ["penguin", "potato", "pigeon"],
          "answers": ["penguin", "pigeon"], "idx": {"passage": 3, "query": 4}}
    ds = superglue.record_examples(tf.data.Dataset.from_tensors(ex))
    rows = list(ds.as_numpy_iterator())
    assert [_s(r["targets"]) for r in rows] == ["penguin", "pigeon"]
    assert _s(rows[0]["inputs"]) == ("record query: A @placeholder is a bird. entities: "
                                     "penguin, potato, pigeon passage: This is the passage. "
                                     "A bird. sings")
    ex = {"paragraph": "<b>Sent 1: </b>Bob ran.<br><b>Sent 2: </b>He won.", "question": "Who?",
          "answer": "Bob", "label": 1, "idx": {"paragraph": 1, "question": 2, "answer": 3}}
    out = _one(lambda ds: ds.map(superglue.multirc_example), ex)
    assert _s(out["inputs"]) == ("multirc question: Who? answer: Bob paragraph: Sent 1: Bob ran. "
                                 "Sent 2: He won.")
    assert superglue.multirc_postprocess(b"True", example=out, is_target=True) == {
        "value": 1, "group": 2}  # T5 groups by the question's idx alone
    assert superglue.multirc_postprocess("maybe") == {"value": -1}


def test_unlabelled_test_examples_get_unk():
    pre = text_to_text.text_to_text("sst2 sentence: {sentence}", label_names=("a", "b"))
    out = _one(pre, {"sentence": "x", "label": tf.constant(-1, tf.int64)})
    assert _s(out["targets"]) == "<unk>"


@pytest.mark.parametrize("task_name, tfds_name", [
    *[(f"glue_{t}", f"glue/{t}") for t in glue.TASKS],
    *[(f"super_glue_{t}", f"super_glue/{t}") for t in superglue.TASKS],
    ("super_glue_wsc", "super_glue/wsc.fixed"),
])
def test_postprocessors_map_label_words_back(task_name, tfds_name):
    task = seqio.get_mixture_or_task(task_name)
    words = _labels(tfds_name)
    assert [task.postprocess_fn(w.encode()) for w in words] == list(range(len(words)))
    # T5 looks the decoded text up as it is: a label word with a space around it is no label
    assert [task.postprocess_fn(f" {w}") for w in words] == [-1] * len(words)
    for unknown in ("", "maybe", "<unk>", words[0].upper() + "x"):
        assert task.postprocess_fn(unknown) == -1


def test_stsb_and_text_postprocessors():
    stsb = seqio.get_mixture_or_task("glue_stsb")
    assert stsb.postprocess_fn(b"3.4") == pytest.approx(3.4)
    assert stsb.postprocess_fn("five") == -1.0
    squad = seqio.get_mixture_or_task("squad_v1")
    assert squad.postprocess_fn(b"Denver Broncos") == "Denver Broncos"
    assert squad.postprocess_fn(b"x", example={"answers": [b"a", b"b"]},
                                is_target=True) == ["a", "b"]
    assert seqio.get_mixture_or_task("wmt14_ende").postprocess_fn(b"Hallo") == "Hallo"


def test_stsb_targets_round_to_point_two():
    labels = [0.0, 0.09, 0.11, 1.8, 2.29, 2.31, 3.52, 4.9, 5.0]
    ds = tf.data.Dataset.from_tensor_slices({"label": tf.constant(labels, tf.float32)})
    got = [_s(t) for t in ds.map(glue.stsb_target).as_numpy_iterator()]
    assert got == ["0.0", "0.0", "0.2", "1.8", "2.2", "2.4", "3.6", "4.8", "5.0"]


# --------------------------------------------------------------------------- mixtures, sizes

# Train sizes in TFDS's catalog for glue:2.0.0 (T5's glue_utils.py lists the same, QQP 363,849).
GLUE_TRAIN = {"cola": 8_551, "sst2": 67_349, "mrpc": 3_668, "qqp": 363_846, "stsb": 5_749,
              "mnli": 392_702, "qnli": 104_743, "rte": 2_490, "wnli": 635}


def test_glue_mixture_rates_follow_the_formula(monkeypatch):
    sizes = {f"glue/{t}:2.0.0": n for t, n in GLUE_TRAIN.items()}
    monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples",
                        lambda self, split: sizes[self.tfds_dataset.name])
    n = np.array([GLUE_TRAIN[t] for t in glue.TRAIN_TASKS], float)
    for name, temperature in (("glue_proportional", 1), ("glue_temperature_2", 2),
                              ("glue_equal", np.inf)):
        rates = tasks.mixing_rates(name)
        assert sorted(rates) == sorted(f"glue_{t}" for t in glue.TRAIN_TASKS)
        raw = n ** (1 / temperature)
        np.testing.assert_allclose([rates[f"glue_{t}"] for t in glue.TRAIN_TASKS],
                                   raw / raw.sum(), rtol=1e-12)
    assert tasks.mixing_rates("glue_equal")["glue_rte"] == pytest.approx(1 / 8)
    # hand-checked: MNLI's share of the 949,098 training examples of T5's eight GLUE tasks
    assert tasks.mixing_rates("glue_proportional")["glue_mnli"] == pytest.approx(
        392_702 / 949_098)
    monkeypatch.setattr(tasks, "tfds_size", lambda task, split: 1)  # every dataset "prepared"
    row = next(r for r in tasks.list_tasks() if r["name"] == "glue_temperature_2")
    assert row["rates"]["glue_cola"] == pytest.approx(
        round(np.sqrt(8_551) / np.sqrt(n).sum(), 4))


class TinyLabelled(tfds.core.GeneratorBasedBuilder):
    """A 7 + 3 example dataset prepared offline, to read real TFDS metadata sizes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"sentence": f"sentence number {i}", "label": i % 2}


def test_sizes_come_from_tfds_metadata_or_read_na(tmp_path):
    TinyLabelled(data_dir=str(tmp_path / "ready")).download_and_prepare()
    try:
        for name, data_dir in (("tiny_ready", "ready"), ("tiny_absent", "absent")):
            source = seqio.TfdsDataSource("tiny_labelled:1.0.0",
                                          tfds_data_dir=str(tmp_path / data_dir),
                                          splits={"train": "train", "validation": "validation"})
            tasks.register_t2t_task(name, source, inputs="tiny: {sentence}",
                                    label_names=("even", "odd"))
        rows = {r["name"]: r for r in tasks.list_tasks()}
        assert rows["tiny_ready"]["sizes"] == {"train": 7, "validation": 3}
        assert rows["tiny_absent"]["sizes"] == {"train": "n/a", "validation": "n/a"}
        tasks.register_mixture("tiny_mix", ["tiny_ready"])
        assert {r["name"]: r for r in tasks.list_tasks()}["tiny_mix"]["rates"] == {
            "tiny_ready": 1.0}
        tasks.register_mixture("tiny_mix", ["tiny_ready", "tiny_absent"])
        assert {r["name"]: r for r in tasks.list_tasks()}["tiny_mix"]["rates"] == "n/a"
        out = _processed("tiny_ready", "train")
        pairs = sorted((_s(ex["inputs_pretokenized"]), _s(ex["targets_pretokenized"]))
                       for ex in out)  # TFDS shuffles examples when it writes them
        assert pairs == [(f"tiny: sentence number {i}", ("even", "odd")[i % 2]) for i in range(7)]
    finally:
        seqio.MixtureRegistry.remove("tiny_mix")
        for name in ("tiny_ready", "tiny_absent"):
            seqio.TaskRegistry.remove(name)


def test_register_a_task_in_one_call_as_the_readme_shows(mock):
    task = tasks.register_t2t_task(
        "imdb_sentiment", "tfds:imdb_reviews/plain_text:1.0.0",
        inputs="imdb review: {text}", label_names=("negative", "positive"),
        splits={"train": "train", "validation": "test"})
    try:
        raw = list(tfds.as_numpy(tfds.load("imdb_reviews/plain_text", split="test")))
        out = _processed("imdb_sentiment")
        assert [_s(ex["inputs_pretokenized"]) for ex in out] == [
            f"imdb review: {_s(x['text'])}" for x in raw]
        assert [task.postprocess_fn(ex["targets_pretokenized"]) for ex in out] == [
            int(x["label"]) for x in raw]
    finally:
        seqio.TaskRegistry.remove("imdb_sentiment")


def test_registration_errors():
    with pytest.raises(UserError, match="exactly one of inputs"):
        tasks.register_t2t_task("bad_task", "tfds:glue/sst2:2.0.0")
    with pytest.raises(UserError, match="exactly one of targets"):
        tasks.register_t2t_task("bad_task", "tfds:glue/sst2:2.0.0", inputs="x {sentence}")
    with pytest.raises(UserError, match="NAME/CONFIG:VERSION"):
        tasks.register_t2t_task("bad_task", "tfds:glue/sst2", inputs="{sentence}",
                                targets="{sentence}")
    with pytest.raises(UserError, match="plain"):
        text_to_text.template_fn("score {label:.1f}")
    with pytest.raises(UserError, match="already a mixture"):
        tasks.register_t2t_task("glue_equal", "tfds:glue/sst2:2.0.0", inputs="{sentence}",
                                label_names=("a", "b"))
    with pytest.raises(UserError, match="names \\['missing'\\]"):
        text_to_text.template_fn("x {missing}")({"sentence": tf.constant("s")})
    assert "bad_task" not in seqio.TaskRegistry.names()
