"""The ``--gin_file`` flags that train, eval and infer share, and what T5X's eval.gin and
infer.gin fill in for the last two (the checkpoint, task, split and output folder).

Kept apart from ``cli.py`` so that the eval verb (``cli_eval.py``) and the verb table both use
it without importing each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_gin_arguments(p: argparse.ArgumentParser) -> None:
    """``--gin_file`` and ``--gin_search_paths``; ``--gin.BINDING=VALUE`` is split off the
    command line by ``cli.main`` before argparse sees it."""
    p.add_argument("--gin_file", action="append", help="a gin file, ours (configs/gin/) or "
                   "T5X's; repeat for more; --gin.BINDING=VALUE after the flags overrides")
    p.add_argument("--gin_search_paths", action="append",
                   help="folder to look for included gin files in (T5X's flag); repeatable")


def fill_run_values(args: argparse.Namespace, verb: str) -> None:
    """eval/infer with ``--gin_file`` (T5X's eval.gin): the checkpoint, task and split the gin
    files name fill the flags not given; the model comes from the checkpoint's own config."""
    from t5x_like.errors import UserError

    if getattr(args, "gin_file", None) or getattr(args, "gin_bindings", None):
        from t5x_like import gin_config

        run = gin_config.load(args.gin_file or [], args.gin_bindings or [],
                              args.gin_search_paths or [], verb).run
        args.checkpoint = args.checkpoint or run.get("checkpoint")
        for name in ("task", "split"):
            if hasattr(args, name) and not getattr(args, name):
                setattr(args, name, run.get(name))
        if run.get("output_dir") and hasattr(args, "json") and not args.json:
            Path(run["output_dir"]).mkdir(parents=True, exist_ok=True)  # T5X's EVAL_OUTPUT_DIR
            args.json = str(Path(run["output_dir"]) / "metrics.json")
    if not args.checkpoint:
        raise UserError("pass --checkpoint WORKDIR (or set CHECKPOINT_PATH in the gin files)")
    from t5x_like.interop import t5x

    if t5x.is_t5x_checkpoint(args.checkpoint):
        raise UserError(f"{args.checkpoint} is a T5X checkpoint; import it first with "
                        f"t5x-like import-t5x {args.checkpoint} WORKDIR and pass WORKDIR")
