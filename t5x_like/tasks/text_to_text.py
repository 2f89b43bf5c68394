"""Text-to-text tasks (T5's format): one call registers a labelled TFDS dataset as a seqio Task.

    register_t2t_task("imdb", "tfds:imdb_reviews/plain_text:1.0.0",
                      inputs="imdb review: {text}", label_names=("negative", "positive"),
                      metric_fns=[metrics.accuracy], splits={"train": "train",
                                                             "validation": "test"})

A task has two output features, "inputs" and "targets" (EOS appended to both), tokenised with
the default vocabulary unless another is given. Its text comes either from templates
(``inputs="sst2 sentence: {sentence}"``: ``{field}`` is the source example's string feature;
``targets`` a template too, or ``label_names`` to write the class word of the integer "label"
feature, ``<unk>`` for the unlabelled -1 of test splits) or from a ``preprocessor`` that maps
the source dataset to {"inputs", "targets", ...} string examples (SQuAD, ReCoRD, WSC).
Features listed in ``keep`` (e.g. "idx") travel with each example for the postprocessor and
metrics, as seqio passes whole examples to them.

Class words go back to class ids with ``label_to_id`` (an unknown word is -1, which every
classification metric counts as wrong). Nothing here downloads: ``tfds_size`` reads sizes from
TFDS metadata only when the dataset is already prepared.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5x_like.errors import UserError
from t5x_like.tasks.pretraining import TFDS_PREFIX, default_vocabulary

Preprocessor = Callable[[tf.data.Dataset], tf.data.Dataset]
DEFAULT_SPLITS = {"train": "train", "validation": "validation"}
UNKNOWN_LABEL = "<unk>"  # T5's target for test-split examples without a label (label == -1)


# --------------------------------------------------------------------------- text formats


def template_fn(template: str) -> Callable[[dict], tf.Tensor]:
    """``"sst2 sentence: {sentence}"`` -> a function of a TF example returning that string.

    Literal text is kept as written and each ``{field}`` is the example's string feature, so
    the result is exactly what ``template.format(**example)`` gives in Python.
    """
    parts: list[str | tuple[str]] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(literal)
        if field is not None:
            if not field or spec or conversion:
                raise UserError(f"template {template!r} may only hold plain {{field}} names")
            parts.append((field,))

    def fn(x: dict) -> tf.Tensor:
        missing = [p[0] for p in parts if isinstance(p, tuple) and p[0] not in x]
        if missing:
            raise UserError(f"template {template!r} names {missing}, which the examples lack; "
                            f"they have {sorted(x)}")
        pieces = [x[p[0]] if isinstance(p, tuple) else tf.constant(p) for p in parts]
        return tf.strings.join(pieces) if pieces else tf.constant("")

    return fn


def label_word(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """The class word of an integer label; ``<unk>`` for -1 (unlabelled test examples)."""
    names = tf.constant(list(label_names))
    safe = tf.maximum(tf.cast(label, tf.int32), 0)
    return tf.where(tf.equal(label, -1), tf.constant(UNKNOWN_LABEL), tf.gather(names, safe))


def text_to_text(inputs: str | Callable[[dict], tf.Tensor],
                 targets: str | Callable[[dict], tf.Tensor] | None = None,
                 label_names: Sequence[str] | None = None,
                 keep: Sequence[str] = ()) -> Preprocessor:
    """A preprocessor writing each example as {"inputs", "targets", *keep} strings."""
    if (targets is None) == (label_names is None):
        raise UserError("give a text-to-text task exactly one of targets= (a template) or "
                        "label_names= (class words for the integer 'label' feature)")
    make_inputs = template_fn(inputs) if isinstance(inputs, str) else inputs
    if label_names is not None:
        def make_targets(x):
            return label_word(x["label"], label_names)
    else:
        make_targets = template_fn(targets) if isinstance(targets, str) else targets

    def convert(x: dict) -> dict:
        out = {k: x[k] for k in keep}
        out["inputs"] = make_inputs(x)
        out["targets"] = make_targets(x)
        return out

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


def pad_punctuation(text: tf.Tensor) -> tf.Tensor:
    """Spaces around every ASCII punctuation mark, runs of whitespace collapsed (T5's SQuAD)."""
    text = tf.strings.regex_replace(text, r"([[:punct:]])", r" \1 ")
    return tf.strings.regex_replace(text, r"\s+", " ")


def regex_escape(text: tf.Tensor) -> tf.Tensor:
    """``text`` with RE2's special characters backslash-escaped, so it matches literally."""
    return tf.strings.regex_replace(text, r"([\\.^$|?*+()\[\]{}])", r"\\\1")


# --------------------------------------------------------------------------- postprocessing


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def label_to_id(output, label_names: Sequence[str], example=None, is_target=False,
                strip: bool = False) -> int:
    """The class id of a decoded label word; -1 when the word is not a label (T5's rule, which
    takes the text as decoded: " neutral" is -1). ``strip=True`` is the lenient variant that
    drops surrounding whitespace first; its scores are not comparable with T5's."""
    del example, is_target
    word = _text(output)
    word = word.strip() if strip else word
    return list(label_names).index(word) if word in label_names else -1


def labels_postprocessor(label_names: Sequence[str], strip: bool = False) -> Callable:
    """seqio postprocess_fn mapping label words to class ids (``strip``: see label_to_id)."""
    return functools.partial(label_to_id, label_names=tuple(label_names), strip=strip)


def string_to_float(output, example=None, is_target=False, default: float = -1.0) -> float:
    """A decoded number (STS-B's "3.4"); ``default`` when the text is not one."""
    del example, is_target
    try:
        return float(_text(output))
    except ValueError:
        return default


def decoded_text(output, example=None, is_target=False) -> str:
    """The decoded string itself (summaries, translations)."""
    del example, is_target
    return _text(output)


# --------------------------------------------------------------------------- registration


def tfds_source(spec: str, splits: Mapping[str, str] | None = None) -> seqio.TfdsDataSource:
    """A seqio source for ``"tfds:NAME/CONFIG:VERSION"``; ``splits`` maps our split names to
    TFDS split strings (default train/validation)."""
    if not spec.startswith(TFDS_PREFIX) or ":" not in spec[len(TFDS_PREFIX):]:
        raise UserError(f"source {spec!r} must read tfds:NAME/CONFIG:VERSION, "
                        "e.g. tfds:glue/sst2:2.0.0")
    return seqio.TfdsDataSource(tfds_name=spec[len(TFDS_PREFIX):],
                                splits=dict(splits or DEFAULT_SPLITS))


def text_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """T5's features: "inputs" and "targets", both ending in EOS."""
    vocab = vocabulary or default_vocabulary()
    return {"inputs": seqio.Feature(vocab, add_eos=True, dtype=tf.int32),
            "targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}


def register_t2t_task(
    name: str,
    source: str | seqio.DataSource,
    *,
    inputs: str | Callable | None = None,
    targets: str | Callable | None = None,
    label_names: Sequence[str] | None = None,
    preprocessor: Preprocessor | None = None,
    keep: Sequence[str] = (),
    splits: Mapping[str, str] | None = None,
    postprocess_fn: Callable | None = None,
    metric_fns: Sequence[Callable] = (),
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Registers (or replaces) the text-to-text task ``name`` and returns it.

    Text comes from ``inputs`` + ``targets``/``label_names`` (see ``text_to_text``) or from
    ``preprocessor``; ``postprocess_fn`` defaults to label word -> class id when
    ``label_names`` is given, else the decoded text.
    """
    if (preprocessor is None) == (inputs is None):
        raise UserError(f"task {name!r} needs exactly one of inputs= (a template) or "
                        "preprocessor= (a dataset function)")
    if preprocessor is None:
        preprocessor = text_to_text(inputs, targets, label_names, keep)
    if postprocess_fn is None:
        postprocess_fn = labels_postprocessor(label_names) if label_names else decoded_text
    data_source = tfds_source(source, splits) if isinstance(source, str) else source
    if name in seqio.MixtureRegistry.names():
        raise UserError(f"{name!r} is already a mixture; pick another name for the task")
    seqio.TaskRegistry.remove(name)  # registering again replaces, as for pretraining tasks
    try:
        return seqio.TaskRegistry.add(
            name,
            source=data_source,
            output_features=text_features(vocabulary),
            preprocessors=[preprocessor, seqio.preprocessors.tokenize,
                           seqio.CacheDatasetPlaceholder(),
                           seqio.preprocessors.append_eos_after_trim],
            postprocess_fn=postprocess_fn,
            metric_fns=list(metric_fns),
        )
    except ValueError as e:  # seqio's own checks: the name, the functions' signatures
        raise UserError(f"cannot register task {name!r}: {e}") from None


def tfds_size(task: seqio.Task, split: str) -> int | None:
    """Examples in ``split`` of a TFDS-backed task from TFDS metadata, or None when the
    dataset is not prepared locally (or the task is not TFDS-backed). Never downloads."""
    source = task.source
    if not isinstance(source, seqio.TfdsDataSource) or split not in source.splits:
        return None
    loader = source.tfds_dataset
    try:
        name, data_dir = loader.get_split_params(split)
        tfds_split = loader._map_split(split)  # seqio 0.0.20 exposes the split map no other way
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            return None
        return int(builder.info.splits[tfds_split].num_examples)
    except Exception:  # unknown builder, a broken local copy: the size is simply unknown
        return None
