"""GLUE as T5 writes it: "<task> <field>: <text> ..." inputs and label words as targets.

Fields follow T5's order (sorted names: ``mnli hypothesis: ... premise: ...``); label words are
TFDS's class names (``glue/<task>:2.0.0``); STS-B's score is rounded to the nearest 0.2 and
written with one decimal ("3.4"), a 26-way classification read back as a float. MNLI trains
on "train" and validates on "validation_matched"; ``glue_mnli_matched`` and
``glue_mnli_mismatched`` are its two evaluation sets, and ``glue_ax`` the diagnostic set
written as MNLI (test split only, no labels, no metrics). Mixtures of T5's eight training
tasks (WNLI is left out, as T5 trains on WSC/DPR instead): ``glue_proportional`` (rates
proportional to train sizes, T5's ``glue_v002_proportional``), ``glue_temperature_2``
(sizes ** 1/2) and ``glue_equal``.
"""

from __future__ import annotations

import math

import tensorflow as tf

from t5x_like.evaluation import metrics
from t5x_like.tasks.mixtures import register_mixture
from t5x_like.tasks.text_to_text import register_t2t_task, string_to_float

VERSION = "2.0.0"
TEST = {"train": "train", "validation": "validation", "test": "test"}

# name: (T5's input template, TFDS's label words, metric functions)
TASKS = {
    "cola": ("cola sentence: {sentence}", ("unacceptable", "acceptable"),
             [metrics.matthews_corrcoef]),
    "sst2": ("sst2 sentence: {sentence}", ("negative", "positive"), [metrics.accuracy]),
    "mrpc": ("mrpc sentence1: {sentence1} sentence2: {sentence2}",
             ("not_equivalent", "equivalent"), [metrics.f1_binary, metrics.accuracy]),
    "qqp": ("qqp question1: {question1} question2: {question2}",
            ("not_duplicate", "duplicate"), [metrics.f1_binary, metrics.accuracy]),
    "mnli": ("mnli hypothesis: {hypothesis} premise: {premise}",
             ("entailment", "neutral", "contradiction"), [metrics.accuracy]),
    "qnli": ("qnli question: {question} sentence: {sentence}", ("entailment", "not_entailment"),
             [metrics.accuracy]),
    "rte": ("rte sentence1: {sentence1} sentence2: {sentence2}",
            ("entailment", "not_entailment"), [metrics.accuracy]),
    "wnli": ("wnli sentence1: {sentence1} sentence2: {sentence2}",
             ("not_entailment", "entailment"), [metrics.accuracy]),
}
STSB_TEMPLATE = "stsb sentence1: {sentence1} sentence2: {sentence2}"
TRAIN_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")  # T5's, no WNLI
MIXTURES = {"glue_proportional": 1.0, "glue_temperature_2": 2.0, "glue_equal": math.inf}


def stsb_target(x: dict) -> tf.Tensor:
    """The similarity score rounded to the nearest 0.2, as text with one decimal."""
    return tf.strings.as_string(tf.round(x["label"] * 5) / 5, precision=1)


def register(vocabulary=None) -> None:
    """Registers glue_<task> for every GLUE task, the MNLI eval sets, AX and the mixtures."""
    for name, (template, labels, metric_fns) in TASKS.items():
        splits = ({"train": "train", "validation": "validation_matched"} if name == "mnli"
                  else TEST)
        register_t2t_task(f"glue_{name}", f"tfds:glue/{name}:{VERSION}", inputs=template,
                          label_names=labels, keep=("idx",), splits=splits,
                          metric_fns=metric_fns, vocabulary=vocabulary)
    template, labels, metric_fns = TASKS["mnli"]
    for which in ("matched", "mismatched"):
        register_t2t_task(f"glue_mnli_{which}", f"tfds:glue/mnli_{which}:{VERSION}",
                          inputs=template, label_names=labels, keep=("idx",),
                          splits={"validation": "validation", "test": "test"},
                          metric_fns=metric_fns, vocabulary=vocabulary)
    register_t2t_task("glue_ax", f"tfds:glue/ax:{VERSION}", inputs=template, label_names=labels,
                      keep=("idx",), splits={"test": "test"}, vocabulary=vocabulary)
    register_t2t_task("glue_stsb", f"tfds:glue/stsb:{VERSION}", inputs=STSB_TEMPLATE,
                      targets=stsb_target, keep=("idx",), splits=TEST,
                      postprocess_fn=string_to_float,
                      metric_fns=[metrics.pearson_corrcoef, metrics.spearman_corrcoef],
                      vocabulary=vocabulary)
    for mixture, temperature in MIXTURES.items():
        register_mixture(mixture, [f"glue_{t}" for t in TRAIN_TASKS], temperature=temperature)

