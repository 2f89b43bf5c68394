"""A checkpoint's score on a text-to-text task or mixture, with the task's own metrics.

This is seqio's ``Evaluator`` contract, run on one of our checkpoints:

1. read the split's examples (``inputs_pretokenized`` / ``targets_pretokenized`` and whatever
   the task keeps, e.g. ``idx``) in order, and tokenise the text with the *checkpoint's*
   vocabulary (the default one for every registered task: the same ids seqio writes), inputs
   cut to ``data.inputs_length`` with EOS kept;
2. decode fixed-shape batches of ``data.batch_size`` rows with the family's ``predict_batch``
   (greedy, or beam search where it takes ``decoding.Options``; the last batch is padded with
   dummy rows that are thrown away), up to as many tokens as the split's longest target
   (EOS included: seqio's evaluator infers its lengths the same way);
3. detokenise up to the first EOS and apply ``task.postprocess_fn(text, example=ex,
   is_target=False)``; targets go through it with ``is_target=True``, as in seqio;
4. call every ``predict_metric_fns(targets, predictions)``; ``score_metric_fns(targets,
   scores)`` get the log-likelihood of each target from ``score_batch``.

Scoring (``score_metric_fns`` and rank classification below) packs several (inputs, targets)
pairs per row when the checkpoint's ``data.pack`` is on, as its fine-tuning did
(``finetune.packing``: first-fit-decreasing, ``*_segment_ids``/``*_positions``; rows of
``data.inputs_length`` inputs and targets in the same proportion as the pairs'); each pair's
score is read from its own slot, the same number as one pair per row. Decoding stays one
example per row.

Rank classification (zero/few-shot) replaces step 2 for tasks with label words: every label
string is scored after the input with ``score_batch`` and the best is the prediction
(``metrics.rank_classification``); K demonstrations ``"input label"`` drawn from the first
``SHOT_POOL`` labelled train examples with a fixed seed go in front of each input. A prompt
longer than ``data.inputs_length`` loses its front (the oldest demonstrations). Its metrics
are named ``<metric>_rank_<K>shot`` so they never mix with decoded ones.

A mixture reports each member task and, as the T5 paper reports GLUE, their average: a task's
metrics are averaged first (MRPC's F1 and accuracy, STS-B's two correlations), then the tasks.
The report goes to stdout as a table, to ``--json PATH``, and to TensorBoard under the
checkpoint's ``tensorboard/`` as ``eval/<task>/<metric>`` at the checkpoint's step (process 0).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
import seqio

from t5x_like import partitioning
from t5x_like.errors import UserError
from t5x_like.evaluation import metrics as metrics_lib
from t5x_like.finetune import packing

SHOT_POOL = 1000  # train examples read to draw in-context demonstrations from


@dataclasses.dataclass(frozen=True)
class Options:
    """How to evaluate: the split, how many batches (0 = all), beam search (``beam_size`` > 1,
    length penalty ``alpha``) instead of greedy decoding, or rank classification with
    ``shots`` demonstrations (``seed`` picks them)."""

    split: str | None = None  # None: the checkpoint's data.eval_split
    num_batches: int = 0
    rank_classification: bool = False
    shots: int = 0
    seed: int = 0
    beam_size: int = 1
    alpha: float = 0.0

    def __post_init__(self):
        if self.num_batches < 0:
            raise UserError(f"--batches must be >= 0 (0 = every example), got {self.num_batches}")
        if self.shots < 0:
            raise UserError(f"--shots must be >= 0, got {self.shots}")
        if self.shots and not self.rank_classification:
            raise UserError("--shots K puts K demonstrations in front of each input for "
                            "rank classification; add --rank-classification")
        if self.beam_size > 1 and self.rank_classification:
            raise UserError("--beam-size applies to decoding; rank classification scores the "
                            "label words instead, so drop one of them")


@dataclasses.dataclass
class TaskResult:
    """One task's metrics, with what they were computed from (for inspection and tests)."""

    name: str
    metrics: dict[str, float]
    outputs: list[str]  # decoded text, or the chosen label word
    predictions: list  # postprocessed outputs
    targets: list  # postprocessed targets
    shots: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    scores: np.ndarray | None = None  # rank classification: log-likelihoods [examples, labels]


# --------------------------------------------------------------------------- tasks and examples


def has_task_metrics(name: str) -> bool:
    """Whether ``name`` is a mixture, or a task with inputs and metric functions (a pretraining
    task such as "shakespeare" is scored by loss instead)."""
    import t5x_like.tasks  # noqa: F401
    from t5x_like.tasks.mixtures import get_provider

    provider = get_provider(name)
    return isinstance(provider, seqio.Mixture) or (
        "inputs" in provider.output_features and bool(provider.metric_fns))


def _scored(task: seqio.Task) -> bool:
    return "inputs" in task.output_features and bool(task.metric_fns)


def member_tasks(name: str, split: str | None = None) -> tuple[list[seqio.Task], bool]:
    """(leaf tasks, whether ``name`` is a mixture); a UserError for a task without metrics.
    A mixture's training-only members (no metrics, e.g. simple WSC's train task) and, given
    ``split``, those without that split (DPR has no validation set) are left out, as seqio's
    evaluator leaves them out."""
    import t5x_like.tasks  # noqa: F401  (registers the benchmarks)
    from t5x_like.tasks.mixtures import get_provider

    provider = get_provider(name)
    is_mixture = isinstance(provider, seqio.Mixture)
    tasks = [t for t in provider.tasks if _scored(t)] if is_mixture else [provider]
    if is_mixture and split is not None:
        tasks = [t for t in tasks if split in t.splits] or tasks  # none: evaluate_task says so
    if not tasks:
        raise UserError(f"no task of mixture {name!r} has metric functions to evaluate")
    for task in tasks:
        if "inputs" not in task.output_features or not task.metric_fns:
            raise UserError(f"task {task.name!r} has no 'inputs' feature or no metric "
                            "functions, so it has no task metrics; register a text-to-text task "
                            "with t5x_like.tasks.register_t2t_task(..., metric_fns=[...])")
        if task.predict_with_aux_metric_fns:
            raise UserError(f"task {task.name!r} has metric functions of (targets, predictions, "
                            "aux_values), which t5x-like eval does not compute")
    return tasks, is_mixture


def read_examples(task: seqio.Task, split: str, limit: int = 0) -> list[dict]:
    """The split's examples in order (text, kept features), the first ``limit`` if > 0."""
    from t5x_like.finetune.data import examples

    rows = []
    for ex in examples(task.name, split=split, lengths={"inputs": None, "targets": None},
                       seed=0, shuffle=False, repeat=False):
        rows.append(ex)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"split {split!r} of task {task.name!r} has no examples")
    return rows


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def label_names(task: seqio.Task) -> tuple[str, ...]:
    """The class words of a task registered with ``label_names=`` (its postprocessor maps them
    to ids); a UserError for tasks without them."""
    keywords = getattr(task.postprocessor, "keywords", None) or {}
    if "label_names" not in keywords:
        raise UserError(f"rank classification needs a classification task with label words "
                        f"(registered with label_names=...); {task.name!r} has none")
    return tuple(keywords["label_names"])


# --------------------------------------------------------------------------- the model side


class Runner:
    """A checkpoint's ``predict_batch`` / ``score_batch`` over lists of token ids, in
    fixed-shape batches (jitted once per shape, outputs replicated so every host reads them)."""

    def __init__(self, exp, params: dict, *, beam_size: int = 1, alpha: float = 0.0):
        self.exp, self.params = exp, params
        self.vocabulary = exp.vocabulary
        self.eos = int(getattr(exp.vocabulary, "eos_id", 1))
        self.batch_size = exp.config.data.batch_size
        self.inputs_length = exp.config.data.inputs_length
        self.predict_kwargs = {}
        if beam_size > 1:
            from t5x_like import decoding

            if "options" not in inspect.signature(exp.family.predict_batch).parameters:
                raise UserError(f"a {exp.config.family} checkpoint decodes greedily only; drop "
                                "--beam-size")
            self.predict_kwargs["options"] = decoding.Options(beam_size=beam_size, alpha=alpha)
        self._replicated = partitioning.replicated(exp.mesh)
        self.packs = bool(exp.config.data.get("pack", False))  # score several pairs a row
        self.rows_scored = 0  # rows sent to score_batch (padding rows of a last batch too)

    def encode(self, text: str, *, keep_end: bool = False) -> list[int]:
        """Ids of ``text`` + EOS, at most ``inputs_length`` of them: the front kept (seqio's
        trimming), or the end when ``keep_end``."""
        ids = list(self.vocabulary.encode(text))
        room = self.inputs_length - 1
        ids = ids[-room:] if keep_end and len(ids) > room else ids[:room]
        return [*ids, self.eos]

    def _batches(self, rows: Sequence[Sequence[int]], width: int) -> Iterator[np.ndarray]:
        """[batch_size, width] int32 arrays; the last one padded with EOS-only rows."""
        for start in range(0, len(rows), self.batch_size):
            block = np.zeros((self.batch_size, width), np.int32)
            block[:, 0] = self.eos
            for i, ids in enumerate(rows[start:start + self.batch_size]):
                block[i] = 0
                block[i, :len(ids)] = ids
            yield block

    @functools.cached_property
    def _predict(self):
        fn = self.exp.family.predict_batch
        return jax.jit(lambda params, inputs, max_length: fn(
            params, {"inputs": inputs}, max_length=max_length, **self.predict_kwargs),
            static_argnums=2, out_shardings=self._replicated)

    @functools.cached_property
    def _score(self):
        return jax.jit(self.exp.family.score_batch, out_shardings=self._replicated)

    def decode(self, inputs: Sequence[Sequence[int]], max_length: int) -> list[list[int]]:
        """Generated ids per input, up to (not including) the first EOS, padding dropped."""
        out = []
        for block in self._batches(inputs, self.inputs_length):
            tokens = np.asarray(self._predict(self.params, block, max_length))
            if tokens.ndim != 2:
                raise UserError(f"a {self.exp.config.family} checkpoint's predict_batch returns "
                                f"shape {tokens.shape}, not generated text; task metrics need a "
                                "family that decodes text (t5, bart, gpt, t5_finetune)")
            out.extend(tokens)
        generated = []
        for row in out[:len(inputs)]:
            ids = row.tolist()
            ids = ids[:ids.index(self.eos)] if self.eos in ids else ids
            generated.append([t for t in ids if t != 0])
        return generated

    def score(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
              ) -> np.ndarray:
        """log p(targets | inputs) per pair: ``score_batch`` on {"inputs", "targets"}."""
        if hasattr(self.exp.family, "perplexity_window"):
            raise UserError(f"scoring label strings needs an encoder-decoder's score_batch "
                            f"(inputs -> targets); a {self.exp.config.family} checkpoint scores "
                            "token streams")
        if len(inputs) != len(targets) or not inputs:
            raise UserError(f"scoring needs as many targets as inputs (at least one), got "
                            f"{len(inputs)} inputs and {len(targets)} targets")
        if self.packs:
            return self._score_packed(inputs, targets)
        width = max(len(t) for t in targets)
        in_width = max(len(x) for x in inputs)
        scores = []
        for x, y in zip(self._batches(inputs, in_width), self._batches(targets, width),
                        strict=True):
            scores.append(self._call_score({"inputs": x, "targets": y}))
        return np.concatenate(scores)[:len(inputs)].astype(np.float64)

    def _call_score(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        self.rows_scored += len(batch["inputs"])
        try:
            return np.asarray(self._score(self.params, batch))
        except (NotImplementedError, KeyError) as e:
            raise UserError(f"a {self.exp.config.family} checkpoint cannot score "
                            f"(inputs, targets) pairs: {e!r}") from None

    def packed_lengths(self, inputs: Sequence[Sequence[int]],
                       targets: Sequence[Sequence[int]]) -> dict[str, int]:
        """Row lengths for packed scoring: ``data.inputs_length`` inputs (or the longest input),
        and targets in the pairs' own proportion (at least the longest target), so both
        features fill up together."""
        row = max(self.inputs_length, max(len(x) for x in inputs))
        share = sum(len(t) for t in targets) / max(1, sum(len(x) for x in inputs))
        return {"inputs": row,
                "targets": max(max(len(t) for t in targets), int(np.ceil(row * share)))}

    def _score_packed(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                      ) -> np.ndarray:
        """``score`` with the pairs packed first-fit-decreasing (``packing.pack_examples``);
        ``score_batch`` gives one score per example slot, read back in the pairs' order."""
        lengths = self.packed_lengths(inputs, targets)
        pairs = [{"inputs": x, "targets": y} for x, y in zip(inputs, targets, strict=True)]
        rows, where = packing.pack_examples(pairs, lengths)
        filler = packing.pack_row([], lengths)  # weight 0 everywhere, its slots unread
        slots = []
        for start in range(0, len(rows), self.batch_size):
            block = rows[start:start + self.batch_size]
            block += [filler] * (self.batch_size - len(block))
            slots.append(self._call_score({k: np.stack([r[k] for r in block])
                                           for k in block[0]}))
        slots = np.concatenate(slots)
        return np.array([slots[r, s] for r, s in where], np.float64)


# --------------------------------------------------------------------------- one task


def _postprocess(task: seqio.Task, outputs: Sequence[str], examples: Sequence[dict]
                 ) -> tuple[list, list]:
    predictions = [task.postprocess_fn(o, example=ex, is_target=False)
                   for o, ex in zip(outputs, examples, strict=True)]
    targets = [task.postprocess_fn(_text(ex["targets_pretokenized"]), example=ex, is_target=True)
               for ex in examples]
    return predictions, targets



def shot_pool(task: seqio.Task) -> list[tuple[str, str]]:
    """(input text, label word) of the first ``SHOT_POOL`` labelled train examples."""
    if "train" not in task.splits:
        raise UserError(f"--shots draws demonstrations from the train split, which task "
                        f"{task.name!r} lacks")
    words = set(label_names(task))
    pool = [(_text(ex["inputs_pretokenized"]), _text(ex["targets_pretokenized"]))
            for ex in read_examples(task, "train", SHOT_POOL)]
    return [(x, y) for x, y in pool if y in words]


def evaluate_task(runner: Runner, task: seqio.Task, options: Options) -> TaskResult:
    """Metrics of one task (see the module docstring)."""
    if options.split not in task.splits:
        raise UserError(f"task {task.name!r} has no split {options.split!r}; it has "
                        f"{', '.join(sorted(task.splits))}")
    limit = options.num_batches * runner.batch_size
    examples = read_examples(task, options.split, limit)
    texts = [_text(ex["inputs_pretokenized"]) for ex in examples]
    if options.rank_classification:
        return _rank_classify(runner, task, examples, texts, options)
    inputs = [runner.encode(t) for t in texts]
    target_ids = [[*runner.vocabulary.encode(_text(ex["targets_pretokenized"])), runner.eos]
                  for ex in examples]
    generated = runner.decode(inputs, max(len(t) for t in target_ids))
    outputs = [runner.vocabulary.decode(ids) for ids in generated]
    predictions, targets = _postprocess(task, outputs, examples)
    values: dict[str, float] = {}
    for fn in task.predict_metric_fns:
        values.update(fn(targets, predictions))
    if task.score_metric_fns:
        scores = runner.score(inputs, target_ids)
        for fn in task.score_metric_fns:
            values.update(fn(targets, scores))
    return TaskResult(task.name, _floats(values), outputs, predictions, targets)


def _rank_classify(runner: Runner, task: seqio.Task, examples: list[dict], texts: list[str],
                   options: Options) -> TaskResult:
    words = label_names(task)
    shots = (metrics_lib.sample_shots(shot_pool(task), options.shots, options.seed)
             if options.shots else [])
    label_ids = {w: [*runner.vocabulary.encode(w), runner.eos] for w in words}

    def score_fn(prompts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        encoded = {p: runner.encode(p, keep_end=bool(shots)) for p in set(prompts)}
        return runner.score([encoded[p] for p in prompts], [label_ids[w] for w in labels])

    chosen, scores = metrics_lib.rank_classification(score_fn, texts, words, shots=shots)
    outputs = [words[i] for i in chosen]
    predictions, targets = _postprocess(task, outputs, examples)
    values: dict[str, float] = {}
    for fn in task.predict_metric_fns:
        values.update(fn(targets, predictions))
    suffix = f"_rank_{options.shots}shot"
    return TaskResult(task.name, {k + suffix: v for k, v in _floats(values).items()}, outputs,
                      predictions, targets, list(shots), scores)


def _floats(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


# --------------------------------------------------------------------------- report


def average(results: Sequence[TaskResult]) -> float:
    """T5's GLUE/SuperGLUE score: each task's metrics averaged, then the tasks."""
    return float(np.mean([np.mean(list(r.metrics.values())) for r in results]))


def evaluate(exp, params: dict, name: str, options: Options) -> tuple[dict, list[TaskResult]]:
    """({task: {metric: value}} with the mixture's average under its own name, results)."""
    tasks, is_mixture = member_tasks(name, options.split)
    runner = Runner(exp, params, beam_size=options.beam_size, alpha=options.alpha)
    results = [evaluate_task(runner, task, options) for task in tasks]
    table = {r.name: r.metrics for r in results}
    if is_mixture:
        table[name] = {"average": average(results)}
    return table, results


def evaluate_checkpoint(workdir: str | Path, name: str, options: Options, *,
                        overrides=()) -> dict:
    """Loads the newest checkpoint of ``workdir``, evaluates it on task or mixture ``name``,
    and writes TensorBoard scalars there (process 0). Returns the JSON report."""
    from t5x_like.evaluation.driver import load_checkpoint

    tasks, _ = member_tasks(name)  # a wrong name or request stops before anything loads
    if options.rank_classification:
        for task in tasks:
            label_names(task)
    exp, params, step = load_checkpoint(workdir, overrides)
    options = dataclasses.replace(options, split=options.split or exp.config.data.eval_split)
    table, results = evaluate(exp, params, name, options)
    report = {
        "checkpoint": str(workdir),
        "step": step,
        "split": options.split,
        "mode": "rank_classification" if options.rank_classification else "decode",
        "shots": options.shots,
        "beam_size": options.beam_size,
        "examples": {r.name: len(r.targets) for r in results},
        "metrics": table,
    }
    write_tensorboard(workdir, step, table)
    return report


def write_tensorboard(workdir: str | Path, step: int, table: dict[str, dict[str, float]]) -> None:
    """``eval/<task>/<metric>`` scalars in ``workdir/tensorboard`` (beside training's); on
    object storage through a local staging folder, uploaded when done (``storage.Mirror``)."""
    from clu import metric_writers

    from t5x_like import storage

    primary = jax.process_index() == 0
    mirror = storage.Mirror(workdir) if primary and storage.is_remote(workdir) else None
    local = mirror.local if mirror else storage.as_path(workdir)
    writer = metric_writers.create_default_writer(
        str(local / "tensorboard"), just_logging=not primary, asynchronous=False)
    writer.write_scalars(step, {f"eval/{task}/{metric}": value
                                for task, values in table.items()
                                for metric, value in values.items()})
    writer.flush()
    writer.close()
    if mirror:
        mirror.close()


def write_json(report: dict, path: str | Path) -> None:
    """The report as JSON (process 0 only)."""
    if jax.process_index() == 0:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def format_table(report: dict) -> str:
    """The report as a fixed-width table, one metric per line."""
    if report["mode"] == "rank_classification":
        how = f"rank classification, {report['shots']}-shot"
    else:
        how = "greedy decoding" if report["beam_size"] == 1 else f"beam {report['beam_size']}"
    lines = [f"checkpoint {report['checkpoint']} step {report['step']} on split "
             f"{report['split']} ({how})",
             f"  {'task':<28} {'metric':<32} {'value':>9}  examples"]
    for task, values in report["metrics"].items():
        count = report["examples"].get(task, "")
        for metric, value in values.items():
            lines.append(f"  {task:<28} {metric:<32} {value:>9.3f}  {count}")
    return "\n".join(lines)
