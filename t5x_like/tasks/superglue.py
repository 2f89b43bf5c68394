"""SuperGLUE as T5 writes it (``super_glue/<task>:1.0.2``).

Most tasks are "<task> <field>: <text> ..." with sorted field names and TFDS's label words
(BoolQ/MultiRC/WiC/WSC: "False"/"True"). MultiRC puts question, answer, paragraph in that order
with the paragraph's <br>/<b> markup removed; WiC gives sentence1, sentence2, word. ReCoRD
writes "record query: ... entities: a, b, c passage: ..." with one example per gold answer
(passage highlights joined into sentences), and scores EM/F1 once per query, the best over its
answers. WSC (the fixed version) marks the noun with * and the pronoun with #:
"wsc text: # This # is a * test * sentence ." -> "False"; the span is matched as written, so
punctuation attached to its last word stays outside the mark ("# her #.").

T5's other SuperGLUE tasks are here too: the diagnostics ``super_glue_axb``/``axg`` (test
split, written as RTE, no metrics), the simple WSC tasks ("wsc: ... *he* ..." -> the referent;
``super_glue_wsc_simple_train`` keeps the correct referents only, ``..._eval`` scores whether
the predicted noun phrase is the referent), ``dpr_simple`` (Definite Pronoun Resolution in
the same format), and T5's mixture ``super_glue_proportional`` (T5's weights).
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import (
    UNKNOWN_LABEL,
    label_to_id,
    label_word,
    labels_postprocessor,
    regex_escape,
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
    """{"value": class id}, plus the question's idx as the group on targets (T5 groups by the
    question's idx alone, not by (paragraph, question))."""
    out = {"value": label_to_id(output, BOOLEAN)}
    if is_target:
        out["group"] = int(example["idx/question"])
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


def mark_span(text: tf.Tensor, span_text: tf.Tensor, index: tf.Tensor, mark: str) -> tf.Tensor:
    """Surrounds ``span_text`` with ``mark`` where it starts after ``index`` space-separated
    words, matching the span's characters as written (T5's rule: "her." with span "her"
    becomes "# her #."); the text is unchanged when the span is not found there."""
    pattern = tf.strings.join([r"^((?:\S+\s){", tf.strings.as_string(index), "})(",
                               regex_escape(span_text), ")"])
    return tf.strings.regex_replace(text, pattern, rf"\1{mark} \2 {mark}")


def wsc_example(x: dict) -> dict:
    """"wsc text: <text with * noun * and # pronoun #>" -> "True" when they corefer."""
    text = mark_span(x["text"], x["span1_text"], x["span1_index"], "*")
    # the noun's two marks are two more words before a pronoun that follows it
    span2_index = x["span2_index"] + 2 * tf.cast(x["span1_index"] < x["span2_index"],
                                                 x["span2_index"].dtype)
    text = mark_span(text, x["span2_text"], span2_index, "#")
    return {"inputs": tf.strings.join(["wsc text: ", text]),
            "targets": label_word(x["label"], BOOLEAN), "idx": x["idx"]}


# --------------------------------------------------------------------------- simple WSC, DPR

# Two WSC texts whose span2_index points at the wrong word, and T5's blanked version of each
# (t5/data/preprocessors.py ``_wsc_inputs``, t5 0.9.4, Apache-2.0).
WSC_FIXES = {
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    "out quite loud. \"Good for him,\" he said. ":
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    "out quite loud. \"Good for X ,\" he said.",
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use it , but really for now, what "
    "more could they wish for?":
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use X , but really for now, what "
    "more could they wish for?",
}


def wsc_blanked(x: dict) -> tf.Tensor:
    """The text with the pronoun (word ``span2_index``) replaced by "X"."""
    words = tf.strings.split(x["text"], sep=" ")
    i = tf.cast(x["span2_index"], tf.int32)
    text = tf.strings.join([tf.strings.reduce_join(words[:i], separator=" "), "X",
                            tf.strings.reduce_join(words[i + 1:], separator=" ")], separator=" ")
    for broken, fixed in WSC_FIXES.items():
        text = tf.where(tf.equal(x["text"], broken), tf.constant(fixed), text)
    return text


def wsc_simple_example(x: dict) -> dict:
    """"wsc: ... *pronoun* ..." -> the candidate referent (span1), T5's ``wsc_simple``; the
    label (does it corefer?) travels for the evaluation."""
    marked = tf.strings.regex_replace(wsc_blanked(x), " X ",
                                      tf.strings.join([" *", x["span2_text"], "* "]))
    return {"inputs": tf.strings.join(["wsc:", marked], separator=" "),
            "targets": x["span1_text"], "label": x["label"], "idx": x["idx"]}


def wsc_simple(correct_referent_only: bool):
    """The simple-WSC preprocessor; training keeps only the examples whose span1 is right."""

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        if correct_referent_only:
            ds = ds.filter(lambda x: tf.cast(x["label"], tf.bool))
        return ds.map(wsc_simple_example, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


DETERMINERS = frozenset({"a", "an", "few", "her", "his", "each", "every", "many", "much", "my",
                         "our", "some", "that", "the", "their", "these", "this", "those",
                         "which", "whose", "your"})


def wsc_simple_postprocess(output, example=None, is_target=False) -> int:
    """Targets: the example's label. Predictions: 1 when the predicted noun phrase and the
    example's referent (lower case, determiners dropped) contain one another's words, 0 when
    not, -1 when nothing is left (T5's ``wsc_simple`` rule)."""
    if is_target:
        return int(example["label"])

    def clean(text) -> str:
        text = (text.decode() if isinstance(text, bytes) else str(text)).strip().lower()
        return " ".join(w for w in text.split(" ") if w not in DETERMINERS)

    prediction = clean(output)
    if not prediction:
        return -1
    referent = clean(example["targets_pretokenized"])
    if ("'" in prediction) != ("'" in referent):
        return 0
    p, r = set(prediction.split(" ")), set(referent.split(" "))
    return int(p <= r or r <= p)


def dpr_example(x: dict) -> dict:
    """Definite Pronoun Resolution as "wsc: ... *pronoun* ..." -> the right candidate: the
    first " pronoun" followed by a space, "." or "," is marked."""
    pattern = tf.strings.join([" (", regex_escape(x["pronoun"]), r")( |\.|,)"])
    marked = tf.strings.regex_replace(x["sentence"], pattern, r" *\1*\2", replace_global=False)
    return {"inputs": tf.strings.join(["wsc:", marked], separator=" "),
            "targets": tf.gather(x["candidates"], x["label"])}


def axb_example(x: dict) -> dict:
    """SuperGLUE's broad diagnostic written as RTE: "rte hypothesis: s2 premise: s1"."""
    return {"inputs": tf.strings.join(["rte hypothesis:", x["sentence2"], "premise:",
                                       x["sentence1"]], separator=" "),
            "targets": label_word(x["label"], ("entailment", "not_entailment")),
            "idx": x["idx"]}


# T5's SuperGLUE mixture: its weights are the training set sizes (simple WSC: the 259 correct
# referents), t5/data/glue_utils.py; the evaluation-only members have weight 0 and are left out.
MIXTURE_WEIGHTS = {"dpr_simple": 1_322, "super_glue_wsc_simple_train": 259,
                   "super_glue_boolq": 9_427, "super_glue_cb": 250, "super_glue_copa": 400,
                   "super_glue_multirc": 27_243, "super_glue_record": 138_854,
                   "super_glue_rte": 2_490, "super_glue_wic": 5_428}


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
    # diagnostics: test split only, no labels, so no metrics (T5's axb / axg)
    register_t2t_task("super_glue_axb", f"tfds:super_glue/axb:{VERSION}",
                      preprocessor=_mapped(axb_example), splits={"test": "test"},
                      postprocess_fn=labels_postprocessor(("entailment", "not_entailment")),
                      vocabulary=vocabulary)
    register_t2t_task("super_glue_axg", f"tfds:super_glue/axg:{VERSION}",
                      inputs=TASKS["rte"][0], label_names=TASKS["rte"][1], keep=("idx",),
                      splits={"test": "test"}, vocabulary=vocabulary)
    wsc_source = f"tfds:super_glue/wsc.fixed:{VERSION}"
    register_t2t_task("super_glue_wsc_simple_train", wsc_source,
                      preprocessor=wsc_simple(correct_referent_only=True),
                      splits={"train": "train"}, vocabulary=vocabulary)
    register_t2t_task("super_glue_wsc_simple_eval", wsc_source,
                      preprocessor=wsc_simple(correct_referent_only=False),
                      splits={"validation": "validation", "test": "test"},
                      postprocess_fn=wsc_simple_postprocess, metric_fns=[metrics.accuracy],
                      vocabulary=vocabulary)
    register_t2t_task("dpr_simple", "tfds:definite_pronoun_resolution:1.1.0",
                      preprocessor=_mapped(dpr_example),
                      splits={"train": "train", "test": "test"},
                      metric_fns=[metrics.accuracy], vocabulary=vocabulary)
    seqio.MixtureRegistry.remove("super_glue_proportional")
    seqio.MixtureRegistry.add("super_glue_proportional",
                              [(t, float(w)) for t, w in MIXTURE_WEIGHTS.items()])
