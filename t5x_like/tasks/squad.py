"""SQuAD v1.1 and TriviaQA as T5 writes them.

- ``squad_v1`` (T5's ``squad_v010_allanswers``): "question: <q> context: <c>" -> the first
  gold answer. T5 puts spaces around punctuation in the question, context and answers (and
  collapses whitespace) before joining; every gold answer (padded the same way) travels with
  the example so EM/F1 take the best over them, after the official normalisation
  (``metrics.squad``).
- ``squad_v1_context_free`` ("squad trivia question: <q>", no context: closed-book QA).
- ``squad_v1_span``: the same inputs -> "start: i end: j", the first occurrence of the answer's
  words in the context's words (both split at non-word characters, as T5 does it, which keeps
  empty words between adjacent ones; the last start position is never tried, as in T5); an
  example whose answer is not found is dropped. Scored by ``metrics.span_squad``.
- ``trivia_qa`` (``trivia_qa/rc``): one example per (context, answer alias) pair whose padded
  alias occurs in the padded context (case-insensitive), "question: <q> context: <c>" -> the
  alias. T5 registers it without metrics; ours scores TriviaQA EM/F1 of the prediction against
  the example's alias. T5 also cuts long inputs to a random window around the answer's tokens;
  ours trims the end, as every task does.
"""

from __future__ import annotations

import tensorflow as tf

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import pad_punctuation, regex_escape, register_t2t_task

TFDS_NAME = "tfds:squad/v1.1:3.0.0"
TRIVIA_QA = "tfds:trivia_qa/rc:1.1.0"


def _joined(pieces: list) -> tf.Tensor:
    """Pieces joined by spaces, runs of whitespace collapsed (T5's ``_string_join``)."""
    return tf.strings.regex_replace(tf.strings.join(pieces, separator=" "), r"\s+", " ")


def squad_example(x: dict, include_context: bool = True) -> dict:
    """{"inputs": "question: q context: c", "targets": answer 0, "answers": all answers}."""
    answers = pad_punctuation(x["answers"]["text"])
    question, context = pad_punctuation(x["question"]), pad_punctuation(x["context"])
    inputs = (_joined(["question:", question, "context:", context]) if include_context
              else _joined(["squad trivia question:", question]))
    return {"inputs": inputs, "targets": answers[0], "answers": answers, "id": x["id"],
            "context": context}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def squad_postprocess(output, example=None, is_target=False):
    """The predicted answer; for a target, the list of every gold answer."""
    if is_target:
        return [_text(a) for a in example["answers"]]
    return _text(output)


def _words(text: tf.Tensor) -> tf.Tensor:
    return tf.strings.split(tf.strings.regex_replace(text, r"\W", " "), sep=" ")


def answer_span(context: tf.Tensor, answer: tf.Tensor) -> tf.Tensor:
    """"start: i end: j" of the answer's words in the context's words, "" when absent."""
    needle, haystack = _words(answer), _words(context)
    n, h = tf.size(needle), tf.size(haystack)
    starts = tf.range(tf.maximum(h - n, 0))
    windows = tf.gather(haystack, starts[:, None] + tf.range(n)[None, :])
    found = tf.reduce_all(tf.equal(windows, needle[None, :]), axis=1)
    hits = tf.cast(tf.where(found)[:, 0], tf.int32)
    return tf.cond(tf.size(hits) > 0,
                   lambda: tf.strings.format("start: {} end: {}", [hits[0], hits[0] + n - 1]),
                   lambda: tf.constant(""))


def span_postprocess(output, example=None, is_target=False):
    """The prediction's text; targets are {"answers": [...], "context": padded context}."""
    if is_target:
        return {"answers": squad_postprocess(output, example, True),
                "context": _text(example["context"])}
    return _text(output)


def _span_preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
    def span(x):
        x = squad_example(x)
        x["targets"] = answer_span(x["context"], x["targets"])
        return x

    ds = ds.map(span, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(lambda x: tf.strings.length(x["targets"]) > 0)


def trivia_qa_examples(ds: tf.data.Dataset) -> tf.data.Dataset:
    """One example per (context, alias) pair where the padded alias occurs in the context."""

    def pairs(x: dict) -> dict:
        contexts = tf.concat([x["entity_pages"]["wiki_context"],
                              x["search_results"]["search_context"]], 0)
        answers = x["answer"]["normalized_aliases"]
        question = pad_punctuation(x["question"])
        c = tf.repeat(pad_punctuation(contexts), tf.size(answers))  # context-major order
        a = tf.tile(pad_punctuation(answers), [tf.size(contexts)])
        pattern = tf.strings.join([".*", regex_escape(tf.strings.lower(a)), ".*"])
        found = tf.map_fn(lambda p: tf.strings.regex_full_match(p[0], p[1]),
                          (tf.strings.lower(c), pattern), fn_output_signature=tf.bool)
        inputs = tf.map_fn(lambda context: _joined(["question:", question, "context:", context]),
                           c, fn_output_signature=tf.string)
        return {"inputs": tf.boolean_mask(inputs, found), "targets": tf.boolean_mask(a, found)}

    return ds.map(pairs, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def trivia_qa_postprocess(output, example=None, is_target=False):
    """The predicted answer; a target is the list holding its one alias."""
    return [_text(output)] if is_target else _text(output)


def _mapped(fn):
    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


def register(vocabulary=None) -> None:
    """Registers squad_v1, squad_v1_context_free, squad_v1_span and trivia_qa."""
    register_t2t_task("squad_v1", TFDS_NAME, preprocessor=_mapped(squad_example),
                      postprocess_fn=squad_postprocess, metric_fns=[metrics.squad],
                      vocabulary=vocabulary)
    register_t2t_task("squad_v1_context_free", TFDS_NAME,
                      preprocessor=_mapped(lambda x: squad_example(x, include_context=False)),
                      postprocess_fn=squad_postprocess, metric_fns=[metrics.squad],
                      vocabulary=vocabulary)
    register_t2t_task("squad_v1_span", TFDS_NAME, preprocessor=_span_preprocess,
                      postprocess_fn=span_postprocess, metric_fns=[metrics.span_squad],
                      vocabulary=vocabulary)
    register_t2t_task("trivia_qa", TRIVIA_QA, preprocessor=trivia_qa_examples,
                      postprocess_fn=trivia_qa_postprocess, metric_fns=[metrics.trivia_qa],
                      vocabulary=vocabulary)
