"""SQuAD v1.1 as T5 writes it: "question: <q> context: <c>" -> the first gold answer.

T5 puts spaces around punctuation in the question, context and answers (and collapses
whitespace) before joining; every gold answer (padded the same way) travels with the example
so EM/F1 take the best over them, after the official normalisation (``metrics.squad``).
"""

from __future__ import annotations

import tensorflow as tf

from t5x_like.evaluation import metrics
from t5x_like.tasks.text_to_text import pad_punctuation, register_t2t_task

TFDS_NAME = "tfds:squad/v1.1:3.0.0"


def squad_example(x: dict) -> dict:
    """{"inputs": "question: q context: c", "targets": answer 0, "answers": all answers}."""
    answers = pad_punctuation(x["answers"]["text"])
    inputs = tf.strings.join(["question: ", pad_punctuation(x["question"]), " context: ",
                              pad_punctuation(x["context"])])
    return {"inputs": tf.strings.regex_replace(inputs, r"\s+", " "), "targets": answers[0],
            "answers": answers, "id": x["id"]}


def squad_postprocess(output, example=None, is_target=False):
    """The predicted answer; for a target, the list of every gold answer."""
    if is_target:
        return [a.decode() if isinstance(a, bytes) else str(a) for a in example["answers"]]
    return output.decode() if isinstance(output, bytes) else str(output)


def _preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(squad_example, num_parallel_calls=tf.data.AUTOTUNE)


def register(vocabulary=None) -> None:
    """Registers squad_v1 (train / validation)."""
    register_t2t_task("squad_v1", TFDS_NAME, preprocessor=_preprocess,
                      postprocess_fn=squad_postprocess, metric_fns=[metrics.squad],
                      vocabulary=vocabulary)
