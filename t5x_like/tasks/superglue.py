"""SuperGLUE as T5 writes it (``super_glue/<task>:1.0.2``).

Most tasks are "<task> <field>: <text> ..." with sorted field names and TFDS's label words
(BoolQ/MultiRC/WiC/WSC: "False"/"True"). MultiRC puts question, answer, paragraph in that order
with the paragraph's <br>/<b> markup removed; WiC gives sentence1, sentence2, word. ReCoRD
writes "record query: ... entities: a, b, c passage: ..." with one example per gold answer
(passage highlights joined into sentences), and scores EM/F1 once per query, the best over its
answers. WSC (the fixed version) marks the noun with * and the pronoun with #:
"wsc text: # This # is a * test * sentence ." -> "False".
"""

from __future__ import annotations

import tensorflow as tf

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import (
    UNKNOWN_LABEL,
    label_to_id,
    label_word,
    labels_postprocessor,
    register_t2t_task,
)

VERSION = "1.0.2"
SPLITS = {"train": "train", "validation": "validation", "test": "test"}
BOOLEAN = ("False", "True")

# name: (T5's input template, TFDS's label words, metric functions)
TASKS = {
    "boolq": ("boolq passage: {passage} question: {question}", BOOLEAN, [metrics.accuracy]),
    "cb": ("cb hypothesis: {hypothesis} premise: {premise}",
           ("entailment", "contradiction", "neutral"), [metrics.macro_f1(3), metrics.accuracy]),
    "copa": ("copa choice1: {choice1} choice2: {choice2} premise: {premise} question: {question}",
             ("choice1", "choice2"), [metrics.accuracy]),
    "rte": ("rte hypothesis: {hypothesis} premise: {premise}", ("entailment", "not_entailment"),
            [metrics.accuracy]),
    "wic": ("wic sentence1: {sentence1} sentence2: {sentence2} word: {word}", BOOLEAN,
            [metrics.accuracy]),
}


# --------------------------------------------------------------------------- MultiRC


def multirc_example(x: dict) -> dict:
    """"multirc question: ... answer: ... paragraph: ..." without HTML, keeping the indices."""
    text = tf.strings.join(["multirc question: ", x["question"], " answer: ", x["answer"],
                            " paragraph: ", x["paragraph"]])
    text = tf.strings.regex_replace(text, "<br>", " ")
    text = tf.strings.regex_replace(text, "<(/)?b>", "")
    return {"inputs": text, "targets": label_word(x["label"], BOOLEAN),
            "idx/paragraph": x["idx"]["paragraph"], "idx/question": x["idx"]["question"],
            "idx/answer": x["idx"]["answer"]}


def multirc_postprocess(output, example=None, is_target=False) -> dict:
    """{"value": class id}, plus the question (paragraph, question) ids on targets."""
    out = {"value": label_to_id(output, BOOLEAN)}
    if is_target:
        out["group"] = (int(example["idx/paragraph"]), int(example["idx/question"]))
    return out


# --------------------------------------------------------------------------- ReCoRD


def record_examples(ds: tf.data.Dataset) -> tf.data.Dataset:
    """One text-to-text example per gold answer (one "<unk>" example when there is none)."""

    def per_answer(x: dict) -> tf.data.Dataset:
        passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n",
                                           r"\1 ")
        passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
        inputs = tf.strings.join(["record query: ", x["query"], " entities: ",
                                  tf.strings.reduce_join(x["entities"], separator=", "),
                                  " passage: ", passage])
        answers = x["answers"]
        targets = tf.cond(tf.size(answers) > 0, lambda: answers,
                          lambda: tf.constant([UNKNOWN_LABEL]))
        n = tf.size(targets)
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.fill([n], inputs),
            "targets": targets,
            "answers": tf.tile(answers[None], [n, 1]),
            "idx/passage": tf.fill([n], x["idx"]["passage"]),
            "idx/query": tf.fill([n], x["idx"]["query"]),
        })

    return ds.flat_map(per_answer)


def record_postprocess(output, example=None, is_target=False) -> dict:
    """{"value": answer}; targets carry every gold answer and the (passage, query) group."""
    if not is_target:
        return {"value": output.decode() if isinstance(output, bytes) else str(output)}
    return {"value": [a.decode() if isinstance(a, bytes) else str(a) for a in example["answers"]],
            "group": (int(example["idx/passage"]), int(example["idx/query"]))}


# --------------------------------------------------------------------------- WSC


def mark_spans(text: tf.Tensor, spans: list[tuple[tf.Tensor, tf.Tensor, str]]) -> tf.Tensor:
    """Surrounds each (word index, span text, mark) span of space-separated words with the mark:
    the span covers as many words as its text has."""
    words = tf.strings.split(text, sep=" ")
    position = tf.range(tf.size(words))
    for index, span_text, mark in spans:
        length = tf.size(tf.strings.split(tf.strings.strip(span_text), sep=" "))
        index = tf.cast(index, tf.int32)
        words = tf.where(position == index, tf.strings.join([mark, " ", words]), words)
        words = tf.where(position == index + length - 1, tf.strings.join([words, " ", mark]),
                         words)
    return tf.strings.reduce_join(words, separator=" ")


def wsc_example(x: dict) -> dict:
    """"wsc text: <text with * noun * and # pronoun #>" -> "True" when they corefer."""
    text = mark_spans(x["text"], [(x["span1_index"], x["span1_text"], "*"),
                                  (x["span2_index"], x["span2_text"], "#")])
    return {"inputs": tf.strings.join(["wsc text: ", text]),
            "targets": label_word(x["label"], BOOLEAN), "idx": x["idx"]}


def _mapped(fn):
    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


def register(vocabulary=None) -> None:
    """Registers super_glue_<task> for boolq, cb, copa, multirc, record, rte, wic and wsc."""
    for name, (template, labels, metric_fns) in TASKS.items():
        register_t2t_task(f"super_glue_{name}", f"tfds:super_glue/{name}:{VERSION}",
                          inputs=template, label_names=labels, keep=("idx",), splits=SPLITS,
                          metric_fns=metric_fns, vocabulary=vocabulary)
    register_t2t_task("super_glue_multirc", f"tfds:super_glue/multirc:{VERSION}",
                      preprocessor=_mapped(multirc_example), splits=SPLITS,
                      postprocess_fn=multirc_postprocess,
                      metric_fns=[metrics.multirc_f1a, metrics.multirc_em],
                      vocabulary=vocabulary)
    register_t2t_task("super_glue_record", f"tfds:super_glue/record:{VERSION}",
                      preprocessor=record_examples, splits=SPLITS,
                      postprocess_fn=record_postprocess, metric_fns=[metrics.record],
                      vocabulary=vocabulary)
    register_t2t_task("super_glue_wsc", f"tfds:super_glue/wsc.fixed:{VERSION}",
                      preprocessor=_mapped(wsc_example), splits=SPLITS,
                      postprocess_fn=labels_postprocessor(BOOLEAN),
                      metric_fns=[metrics.accuracy], vocabulary=vocabulary)
