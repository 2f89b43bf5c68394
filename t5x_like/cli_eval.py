"""``t5x-like eval``: its flags and what they dispatch to: a checkpoint's validation loss
(evaluation/driver.py), a task's or mixture's own metrics (evaluation/task_eval.py), or texts
scored by a learned metric, BLEU, ROUGE or BERTScore (evaluation/learned_metric.py).

``cli.py`` keeps the verb table and calls ``add_parser`` here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t5x_like import cli_gin


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Adds the ``eval`` verb and its flags to ``t5x-like``'s verbs."""
    from t5x_like import distributed

    p = verbs.add_parser("eval", help="validation loss and accuracy of a checkpoint beside a "
                          "unigram baseline; task metrics with --task/--mixture; span fills with "
                          "--samples")
    p.add_argument("--checkpoint", help="a workdir written by train (gin: CHECKPOINT_PATH)")
    cli_gin.add_gin_arguments(p)
    p.add_argument("--task", help="evaluate on this task instead of the training task: its "
                   "metrics (decode -> postprocess -> metric functions) for a text-to-text "
                   "task, the loss for a pretraining task")
    p.add_argument("--mixture", help="every task of this mixture, with their average")
    p.add_argument("--split", help="split to evaluate (default: data.eval_split)")
    p.add_argument("--batches", type=int, default=None,
                   help="number of batches, 0 = all (default: train.eval_batches; every "
                   "example for task metrics)")
    p.add_argument("--rank-classification", action="store_true",
                   help="score each label word with score_batch and pick the best, instead of "
                   "decoding (classification tasks)")
    p.add_argument("--shots", type=int, default=0, help="in-context examples from the train "
                   "split in front of each input (rank classification)")
    p.add_argument("--beam-size", type=int, default=1,
                   help="> 1: beam search instead of greedy decoding (task metrics)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="beam length penalty: score / length**alpha")
    p.add_argument("--samples", type=int, default=0, help="show N held-out spans filled in")
    p.add_argument("--no-baseline", action="store_true", help="skip the unigram baseline")
    p.add_argument("--window", type=int, default=None,
                   help="perplexity window in tokens (gpt; default: one training chunk)")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity stride (default: the window, i.e. disjoint chunks)")
    p.add_argument("--metric", action="append", default=[], metavar="SPEC",
                   help="score texts instead of a checkpoint: learned:WORKDIR (a "
                   "configs/learned_metric.py run), bleu, rouge, bertscore:HF_FOLDER; repeat "
                   "for more; with --references/--predictions or --ratings")
    p.add_argument("--references", help="--metric: reference texts, one a line")
    p.add_argument("--predictions", help="--metric: predicted texts, one a line")
    p.add_argument("--ratings", help="--metric: a TSV reference, candidate, human score "
                   "[, split]: prints each metric's Pearson and Kendall correlation with the "
                   "scores of --split (default test)")
    p.add_argument("--json", help="also write the report to this file")
    distributed.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """The eval verb: texts scored by metrics (--metric), a task's own metrics (--task or
    --mixture of a text-to-text task), or else the checkpoint's validation loss."""
    from t5x_like import distributed

    distributed.initialize(args)
    from t5x_like.errors import UserError
    from t5x_like.evaluation import task_eval

    if args.metric or args.references or args.predictions or args.ratings:
        _metric_scores(args)
        return
    cli_gin.fill_run_values(args, "eval")

    name = args.mixture or args.task
    if name and args.checkpoint:  # tasks the run's data.task_modules register, before lookup
        _import_task_modules_of(args.checkpoint, overrides)
    if name and (args.mixture or args.rank_classification or task_eval.has_task_metrics(name)):
        _task_metrics(args, overrides, name)
        return
    if args.rank_classification or args.shots or args.beam_size > 1:
        raise UserError("--rank-classification/--shots/--beam-size need --task NAME (a "
                        "text-to-text task) or --mixture NAME")
    _loss_evaluation(args, overrides)


def _loss_evaluation(args: argparse.Namespace, overrides: list[str]) -> None:
    """Validation loss and accuracy beside the unigram baseline, with ``--samples`` span fills."""
    from t5x_like.evaluation import driver

    if args.task:
        overrides = [*overrides, f"data.task={args.task}"]
    if args.split:
        overrides = [*overrides, f"data.eval_split={args.split}"]
    report = driver.evaluate_checkpoint(
        args.checkpoint,
        overrides=overrides,
        num_batches=args.batches,
        baseline=not args.no_baseline,
        window=args.window,
        stride=args.stride,
    )
    print(
        f"checkpoint {args.checkpoint} step {report['step']} on {report['task']}/{report['split']}"
        f" ({report['tokens']} target tokens)"
    )
    accuracy = f"   token accuracy {report['accuracy']:.4f}" if "accuracy" in report else ""
    print(f"  validation loss     {report['loss']:.4f}{accuracy}")  # Audio BERT: no tokens
    if "unigram_loss" in report:
        print(f"  unigram baseline    {report['unigram_loss']:.4f}")
    # Every other metric the family reports (per-head accuracies, perplexity, ...), as is.
    for name, value in report.items():
        if name not in ("step", "task", "split", "tokens", "loss", "accuracy", "unigram_loss"):
            print(f"  {name:<19} {value:.4f}" if isinstance(value, float)
                  else f"  {name:<19} {value}")
    if args.samples:
        exp, params, _ = driver.load_checkpoint(args.checkpoint, overrides)
        print("\nheld-out text, masked spans <i>, the model's greedy fills and the truth; then"
              " per span, the model's 3 likeliest first tokens (_ starts a word):")
        for sample in driver.fill_spans(exp, params, num_examples=args.samples):
            print(
                f"\n  masked: {sample['masked']}\n  model:  {sample['model']}"
                f"\n  truth:  {sample['truth']}"
            )
            for span, top in sorted(sample["candidates"].items()):
                print(f"    <{span}> " + "  ".join(f"{piece!r} {p:.3f}" for piece, p in top))
    if args.json:
        import jax

        if jax.process_index() == 0:  # one writer: every process holds the same report
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _import_task_modules_of(checkpoint: str, overrides: list[str]) -> None:
    """Imports the ``data.task_modules`` of the workdir's saved config (overrides applied)."""
    from t5x_like import config as config_lib
    from t5x_like import storage
    from t5x_like.experiment import import_task_modules

    config_file = storage.as_path(checkpoint) / "config.json"
    if not config_file.exists():
        return  # the checkpoint loader reports a missing config in its own sentence
    config = config_lib.config_from_json(config_file)
    config_lib.apply_overrides(config, overrides)
    import_task_modules(config.data.task_modules)


def _metric_scores(args: argparse.Namespace) -> None:
    """``eval --metric SPEC``: texts scored by a learned metric, BLEU, ROUGE or BERTScore
    (evaluation/learned_metric.py), or the metrics' correlation with human ratings."""
    from t5x_like.errors import UserError
    from t5x_like.evaluation import learned_metric

    if not args.metric:
        raise UserError("--references/--predictions/--ratings go with --metric SPEC "
                        "(learned:WORKDIR, bleu, rouge, bertscore:HF_FOLDER)")
    if args.checkpoint or args.task or args.mixture:
        raise UserError("--metric scores texts from files: pass --references and --predictions "
                        "(e.g. what t5x-like infer wrote) or --ratings FILE.tsv, not "
                        "--checkpoint/--task/--mixture")
    if args.ratings:
        if args.references or args.predictions:
            raise UserError("pass either --ratings or --references/--predictions, not both")
        report = learned_metric.score_ratings(args.metric, args.ratings, args.split or "test")
        print(learned_metric.format_ratings(report))
    else:
        if not (args.references and args.predictions):
            raise UserError("--metric needs --references FILE and --predictions FILE (one text "
                            "a line), or --ratings FILE.tsv")
        report = learned_metric.score_texts(args.metric,
                                            learned_metric.read_lines(args.references),
                                            learned_metric.read_lines(args.predictions))
        print(learned_metric.format_texts(report, args.metric))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _task_metrics(args: argparse.Namespace, overrides: list[str], name: str) -> None:
    """``eval --task/--mixture``: the task's own metrics (evaluation/task_eval.py)."""
    from t5x_like.errors import UserError
    from t5x_like.evaluation import task_eval

    if args.samples or args.window or args.stride:
        raise UserError("--samples/--window/--stride belong to the loss evaluation; drop them "
                        f"when evaluating {name!r} with its task metrics")
    options = task_eval.Options(split=args.split, num_batches=args.batches or 0,
                                rank_classification=args.rank_classification, shots=args.shots,
                                beam_size=args.beam_size, alpha=args.alpha)
    report = task_eval.evaluate_checkpoint(args.checkpoint, name, options, overrides=overrides)
    print(task_eval.format_table(report))
    if args.json:
        task_eval.write_json(report, args.json)
