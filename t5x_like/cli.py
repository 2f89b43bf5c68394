"""``t5x-like <verb>``: train, eval, infer, tasks, vocab, import-hf, export-hf, bench, compile,
launch.

Each verb is a thin wrapper over a library function; ``eval``, the one with many modes, has its
flags and dispatch in ``cli_eval.py``, and the gin flags train/eval/infer share are in
``cli_gin.py``. Mistakes a user can fix surface as one line, ``error: ...``, with exit status
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from t5x_like import cli_eval, cli_gin


def _quiet_backends() -> None:
    """TensorFlow (seqio's input pipeline) prints C++ notices at import that no log level
    silences; import it once with stderr pointed at /dev/null so a user sees only our lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        from t5x_like.data import tf_runtime

        tf_runtime.configure()  # imports TensorFlow and hides accelerators from it
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_library_failures() -> None:
    """A failed checkpoint write reaches the user as one ``error:`` sentence that carries
    orbax's reason. Orbax's own copies of that failure stay off stderr: its ERROR records (each
    with a traceback), asyncio's "exception was never retrieved" for its abandoned write tasks,
    and the "Event loop is closed" that tensorstore's late callbacks raise into the event loop
    orbax closed. Other libraries' records and other exceptions pass as before."""
    import logging
    import traceback

    def from_orbax(record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname:
            return True
        tb = record.exc_info[2] if record.exc_info else None
        return any("orbax" in frame.filename for frame in traceback.extract_tb(tb))

    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(lambda record: not from_orbax(record))
    default_hook = sys.unraisablehook

    def hook(unraisable):
        late_callback = (unraisable.exc_type is RuntimeError
                         and str(unraisable.exc_value) == "Event loop is closed")
        if not late_callback:
            default_hook(unraisable)

    sys.unraisablehook = hook


def _cmd_train(args, overrides):
    from t5x_like import distributed

    distributed.initialize(args)  # before any JAX computation; a no-op for one process

    from t5x_like import gin_config

    config, run = gin_config.config_from_args(args, overrides)  # --config or --gin_file
    workdir = args.workdir or run.get("workdir")
    if not workdir:
        from t5x_like.errors import UserError

        raise UserError("pass --workdir (or set MODEL_DIR in the gin files)")
    from t5x_like.train import train

    result = train(config, workdir)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}))


def _cmd_infer(args, overrides):
    from t5x_like import decoding
    from t5x_like.evaluation import driver

    cli_gin.fill_run_values(args, "infer")

    options = decoding.Options(
        beam_size=args.beam_size,
        alpha=args.alpha,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    for text, output in zip(
        args.input,
        driver.infer(args.checkpoint, args.input, max_length=args.max_length, options=options,
                     seed=args.seed),
        strict=True,
    ):
        print(f"{text}\n  -> {output}")


def _cmd_tasks(args, overrides):
    from t5x_like.tasks import list_tasks

    for row in list_tasks():
        extra = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "kind"))
        print(f"{row['kind']:8s} {row['name']}  {extra}")


def _cmd_prepare(args, overrides):
    from t5x_like.errors import UserError

    if args.runner:
        from t5x_like.prepare_beam import prepare_with_beam

        prepare_with_beam(args.task, args.split, args.out, runner=args.runner,
                          pipeline_args=args.beam_option, num_shards=args.shards,
                          seed=args.seed, modules=args.module)
        return
    if args.beam_option:
        raise UserError("--beam-option needs --runner (DirectRunner, DataflowRunner, ...)")
    from t5x_like.prepare import prepare

    prepare(args.task, args.split, args.out, workers=args.workers, num_shards=args.shards,
            seed=args.seed, modules=args.module)


def _cmd_vocab(args, overrides):
    from t5x_like.data import corpus, vocab

    if args.source:
        texts = corpus.read_text_source(args.source)
        out = Path(args.out or Path(args.source).with_suffix(f".sp{args.size}.model"))
    else:
        texts = corpus.default_corpus_texts("train")
        out = Path(args.out) if args.out else vocab.default_vocab_path(args.size)
    if out.exists() and not args.force:
        print(f"vocabulary {out} exists (pass --force to train it again)")
        return
    path = vocab.train_vocab(texts, out, vocab_size=args.size)
    print(f"wrote {path}")


def _cmd_import_hf(args, overrides):
    from t5x_like.interop import checkpoint_io

    checkpoint_io.import_hf(args.src, args.out, overrides)
    print(f"wrote {args.out}")


def _cmd_export_hf(args, overrides):
    from t5x_like.interop import checkpoint_io

    checkpoint_io.export_hf(args.checkpoint, args.out)
    print(f"wrote {args.out}")


def _cmd_import_t5x(args, overrides):
    from t5x_like.interop import t5x

    t5x.import_t5x(args.src, args.out, overrides)
    print(f"wrote {args.out}")


def _cmd_export_t5x(args, overrides):
    from t5x_like.interop import t5x

    print(f"wrote {t5x.export_t5x(args.checkpoint, args.out)}")


def _cmd_bench(args, overrides):
    from t5x_like import bench
    from t5x_like import config as config_lib

    extra = [f"data.batch_size={args.batch}"] if args.batch else []
    peak = bench.parse_peak(args.peak_tflops)
    rows = []
    for dtype in args.dtype.split(",") if args.dtype else [None]:
        for remat in args.remat.split(",") if args.remat else [None]:
            variant = [f"model.dtype={dtype}"] * bool(dtype)
            variant += [f"model.remat_policy={remat}"] * bool(remat)
            config = config_lib.load_config(args.config, [*overrides, *extra, *variant])
            row = bench.run(config, steps=args.steps, warmup=args.warmup, peak_tflops=peak)
            rows.append(row)
            print(bench.format_row(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def _cmd_compile(args, overrides):
    from t5x_like import aot
    from t5x_like import config as config_lib

    config = config_lib.load_config(args.config, overrides)
    report = aot.rehearse(config, args.topology, args.num_slices, eval_step=not args.skip_eval)
    print(aot.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _cmd_launch(args, overrides):
    from t5x_like import launch

    status = launch.main(args, overrides)
    if status:
        raise SystemExit(status)


def _cmd_compress_report(args, overrides):
    from t5x_like.compress import report

    rows = report.build_report(args.checkpoint, args.variant or [], int8=args.int8,
                               prune_heads=args.prune_heads, num_batches=args.batches,
                               repeats=args.repeats, out_dir=args.out)
    print(report.format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in rows], indent=2) + "\n")


def _cmd_report(args, overrides):
    from t5x_like.evaluation.report import images, write_report

    out = write_report(args.run_dirs, args.out, title=args.title)
    print(f"wrote {out}")
    for png in images(out):
        print(f"  plot {png}")


# What import-hf / export-hf take: ``interop.hf.supported_model_types()``, written out so that
# ``--help`` imports nothing heavy (tests/test_cli_help.py checks the two agree).
HF_MODEL_TYPES = ("t5, mt5, bart, bert, roberta, albert, electra, mobilebert, gpt2, xlnet, "
                  "longformer, transfo-xl or reformer")


def build_parser() -> argparse.ArgumentParser:
    from t5x_like import distributed, launch

    parser = argparse.ArgumentParser(
        prog="t5x-like",
        description="Pretrain, evaluate and use BERT-era models in JAX. Config fields can be "
        "overridden after the verb's flags with --config.SECTION.FIELD=VALUE.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train any family from a config file; run it again with the "
                          "same --workdir to resume from its newest checkpoint")
    p.add_argument("--config", help="configs/FILE.py[:preset] (or --gin_file)")
    p.add_argument("--workdir", help="checkpoints, logs and config go here (gin: MODEL_DIR)")
    cli_gin.add_gin_arguments(p)
    distributed.add_arguments(p)
    p.set_defaults(run=_cmd_train)

    cli_eval.add_parser(verbs)

    p = verbs.add_parser(
        "infer", help="decoding of text by a checkpoint: greedy, beam search or sampling"
    )
    p.add_argument("--checkpoint", help="a workdir (gin: CHECKPOINT_PATH)")
    cli_gin.add_gin_arguments(p)
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="text, e.g. 'To be, or <extra_id_0> to be'; repeat for a batch",
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=1, help="> 1: beam search (best beam)")
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="beam length penalty: score / length**alpha (transformers' length_penalty)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="> 0: sample (0 = greedy argmax)"
    )
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.set_defaults(run=_cmd_infer)

    p = verbs.add_parser("tasks", help="list registered tasks and mixtures: splits, source, "
                          "sizes where known, mixing rates")
    p.set_defaults(run=_cmd_tasks)

    p = verbs.add_parser("prepare", help="tokenise a task's split once into a random-access "
                          "store (ArrayRecord + index) that train/eval read with "
                          "--config.data.store=DIR: O(1) resume on any number of hosts")
    p.add_argument("--task", required=True, help="a registered task or mixture (a mixture "
                   "prepares each of its tasks)")
    p.add_argument("--split", required=True, help="e.g. train, then validation, into one DIR")
    p.add_argument("--out", required=True,
                   help="the store folder, local or gs:// (DIR/<task>/<split>/)")
    p.add_argument("--workers", type=int, default=1, help="local processes")
    p.add_argument("--shards", type=int, default=0, help="record files (0 = 4 per worker)")
    p.add_argument("--seed", type=int, default=0, help="the one-time document shuffle's seed")
    p.add_argument("--module", action="append", default=[],
                   help="a module to import first that registers the task (repeatable)")
    p.add_argument("--runner", help="run on Apache Beam instead: DirectRunner, DataflowRunner, "
                   "... (needs the [beam] extra)")
    p.add_argument("--beam-option", action="append", default=[], metavar="--OPT=VALUE",
                   help="a Beam pipeline option, passed through (repeatable), e.g. "
                   "--beam-option=--project=P --beam-option=--region=R")
    p.set_defaults(run=_cmd_prepare)

    p = verbs.add_parser("vocab", help="train a SentencePiece unigram vocabulary (pieces + 100 "
                          "sentinels)")
    vocab_verbs = p.add_subparsers(dest="vocab_verb", required=True)
    q = vocab_verbs.add_parser("train", help="train on the default corpus or a text source")
    q.add_argument("--source", help="a .txt file or folder (default: the default corpus)")
    q.add_argument("--size", type=int, default=8000, help="pieces, before 100 sentinels")
    q.add_argument("--out", help="model path (default: the cache used by default configs)")
    q.add_argument("--force", action="store_true", help="train again if the file exists")
    q.set_defaults(run=_cmd_vocab)

    p = verbs.add_parser("import-hf", help="Hugging Face folder (config.json + safetensors) of "
                          f"{HF_MODEL_TYPES} -> t5x-like workdir")
    p.add_argument("src", help="folder with config.json and model.safetensors")
    p.add_argument("out", help="workdir to create")
    p.set_defaults(run=_cmd_import_hf)

    p = verbs.add_parser("export-hf", help="t5x-like workdir of any model import-hf reads -> "
                          "Hugging Face folder that transformers loads (an mT5 is written as "
                          "model_type t5)")
    p.add_argument("checkpoint", help="a workdir written by train or import-hf")
    p.add_argument("out", help="folder to write config.json and model.safetensors to")
    p.set_defaults(run=_cmd_export_hf)

    p = verbs.add_parser("import-t5x", help="T5X checkpoint (msgpack + TensorStore, T5 / T5 "
                          "1.1, scanned or not) -> t5x-like workdir; its optimizer state is "
                          "not carried over")
    p.add_argument("src", help="a checkpoint_STEP folder, or a T5X model dir (newest step)")
    p.add_argument("out", help="workdir to create")
    p.set_defaults(run=_cmd_import_t5x)

    p = verbs.add_parser("export-t5x", help="t5x-like T5 workdir -> T5X checkpoint_STEP folder "
                          "(T5 1.1 network layout, zero Adafactor state) that T5X restores")
    p.add_argument("checkpoint", help="a workdir written by train, import-hf or import-t5x")
    p.add_argument("out", help="folder to write checkpoint_STEP into")
    p.set_defaults(run=_cmd_export_t5x)

    p = verbs.add_parser("bench", help="synthetic-data step time, tokens/s, TFLOP/s, MFU, memory")
    p.add_argument("--config", required=True, help="configs/FILE.py[:preset]")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--remat", default="", help="none|minimal|dots|full, or a comma list "
                   "(default: the config's model.remat_policy)")
    p.add_argument("--dtype", default="", help="compute dtype float32|bfloat16, or a comma "
                   "list (default: the config's model.dtype); parameters stay float32")
    p.add_argument("--peak-tflops", default="",
                   help="peak TFLOP/s per device for MFU: a number, or 'measure' (default: "
                   "the table's bf16 peak for TPUs and A100/H100/H200; none on CPU)")
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(run=_cmd_bench)

    p = verbs.add_parser("compile", help="pod rehearsal: compile the train and eval steps for "
                         "a TPU or GPU topology on this host; per-chip memory, FLOPs, collectives, "
                         "roofline")
    p.add_argument("--config", required=True, help="configs/FILE.py[:preset]")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5p:8x8x8; or "
                   "GPUs as GPU:[HOSTSx]GPUS_PER_HOST, e.g. h100:8, h100:2x8 (gpu-compile extra)")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined by DCN (set "
                   "--config.mesh.dcn_data or dcn_fsdp to match)")
    p.add_argument("--skip-eval", action="store_true", help="compile the train step only")
    p.add_argument("--json", help="also write the report to this file")
    p.set_defaults(run=_cmd_compile)

    p = verbs.add_parser(
        "launch", help="run train/eval on N local processes, a Cloud TPU VM, GKE or SLURM"
    )
    launch.add_targets(p)
    p.set_defaults(run=_cmd_launch)

    p = verbs.add_parser("compress-report", help="size, CPU latency and MLM accuracy of an "
                         "encoder checkpoint and its compressed variants")
    p.add_argument("--checkpoint", required=True, help="the reference encoder workdir")
    p.add_argument("--variant", action="append", help="a distilled/quantized/pruned workdir "
                   "with the same vocabulary; repeat for more")
    p.add_argument("--int8", action="store_true", help="add each row's int8 export")
    p.add_argument("--prune-heads", type=int, default=0,
                   help="add the checkpoint without its K least important heads")
    p.add_argument("--batches", type=int, default=8, help="validation batches to score")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per row")
    p.add_argument("--out", help="keep the exported folders here (default: a temp folder)")
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(run=_cmd_compress_report)

    p = verbs.add_parser("report", help="Markdown report with training/validation curves and "
                         "eval metrics of one or more runs, side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="workdirs written by train")
    p.add_argument("--out", default="report.md", help="Markdown file (PNGs go beside it)")
    p.add_argument("--title", default="Training report")
    p.set_defaults(run=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    gin_bindings = [a for a in argv if a.startswith("--gin.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith(("--config.",
                                                                           "--gin."))])
    args.gin_bindings = gin_bindings
    _quiet_backends()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notices; our own lines are printed
    _quiet_library_failures()
    from t5x_like import distributed
    from t5x_like.errors import UserError, print_error

    try:
        args.run(args, overrides)
    except UserError as e:
        distributed.wait_for_watchdog(e)  # a peer's death, if that is what caused it
        print_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last completed checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
