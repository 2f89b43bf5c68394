"""Config files, command-line overrides, validation and resolution.

A config file is Python with ``get_config(arg=None) -> ml_collections.ConfigDict``; ``arg`` picks
a preset (``configs/t5_span_corruption.py:tiny``). The schema lives in ``base_config``: every
field a run can read exists there with its default, so an unknown key or a wrong type in a file
or an override is caught by ConfigDict and reported in one sentence before anything compiles.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import site
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from t5x_like.errors import UserError, check

OPTIMIZERS = ("adafactor", "adamw", "lamb")
SCHEDULES = ("rsqrt", "constant", "linear", "cosine")


def base_config(family: str = "t5") -> ml_collections.ConfigDict:
    """Every field a run may read, with defaults; ``model`` and ``objective`` come from the family.

    With the defaults this is T5 v1.1 small pretrained with span corruption on the default corpus.
    """
    from t5x_like.families import family_class  # late: families import models

    cls = family_class(family)
    c = ml_collections.ConfigDict()
    c.family = family
    c.seed = 0
    c.model = ml_collections.ConfigDict(cls.model_defaults())
    c.objective = ml_collections.ConfigDict(cls.objective_defaults())
    for section, fields in getattr(cls, "config_sections", dict)().items():  # e.g. finetune
        c[section] = ml_collections.ConfigDict(fields)
    c.data = ml_collections.ConfigDict(
        dict(
            task="shakespeare",  # a registered seqio task or mixture
            # modules imported before data.task is looked up, comma-separated: e.g.
            # "tasks.c4" (the repository's tasks/ folder, or the copy installed with the
            # package) or "path/to/my_tasks.py"; they register tasks with t5x_like.tasks
            task_modules="",
            vocab_path="",  # SentencePiece model; "" = the default corpus vocabulary (cached)
            # sentencepiece | byte (seqio's ByteVocabulary, ByT5) | char (one id per character;
            # vocab_path = a character list, "" = the default corpus's): every family reads
            # it; data.task must tokenise with it (shakespeare_bytes, shakespeare_chars)
            vocab_kind="sentencepiece",
            inputs_length=512,  # encoder length after corruption; raw chunks are longer
            batch_size=8,  # global batch, split over the mesh's data axes
            eval_split="validation",
            # fine-tuning: several short examples per row (segment ids + positions, as
            # seqio's pack=True); decoding stays one example per row
            pack=False,
            # a `t5x-like prepare` output folder: train and eval read data.task's splits from
            # it with Grain (random access, O(1) resume on any number of hosts); "" streams
            # the task through seqio/tf.data instead (resume replays the stream)
            store="",
            # shard contents checked before step 1: sha256 of local files; on gs:// the
            # server's CRC32C from one listing (no download)
            store_verify=True,
            read_threads=4,  # Grain reader threads per host (store only)
            prefetch_batches=4,  # batches read ahead per host (store only)
        )
    )
    c.loss = ml_collections.ConfigDict(dict(z_loss=1e-4, label_smoothing=0.0))
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adafactor",
            learning_rate=0.01,
            schedule="rsqrt",  # rsqrt: constant for warmup_steps, then 1/sqrt(step) decay (T5)
            warmup_steps=10_000,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=0.0,  # 0 = no global-norm clipping
            grad_accum_steps=1,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            log_every=10,
            eval_every=200,
            eval_batches=8,
            checkpoint_every=200,
            keep_checkpoints=3,
            progress_bar=True,
            # Steps run by one compiled call (a lax.scan over that many batches) between log,
            # eval and checkpoint boundaries: XLA:CPU allocates a step's temporaries afresh
            # at every call, so on CPU 4 steps a call amortise that (benchmarks/RESULTS.md).
            # Results are bit-identical to one step a call; SIGTERM is seen between calls.
            steps_per_call=1,
            # Reliability (README "Reliability"): a checkpoint also every N minutes (0 = off);
            # updates with a non-finite loss or gradient are skipped, and more than
            # max_skipped_steps in a row stop the run; a loss above loss_spike_factor x the
            # running median is logged (0 = off); Cloud TPU/GCE maintenance notices are
            # polled every maintenance_poll_seconds when running on GCE (0 = off).
            checkpoint_every_minutes=0.0,
            max_skipped_steps=10,
            loss_spike_factor=2.0,
            maintenance_poll_seconds=10.0,
        )
    )
    c.mesh = ml_collections.ConfigDict(
        dict(
            data=-1,
            fsdp=1,
            tensor=1,
            # Multislice (several TPU slices, or GPU hosts, joined by the data-center network):
            # data/fsdp/tensor lay out one slice; these multiply data and fsdp across slices.
            dcn_data=1,
            dcn_fsdp=1,
            rules="fsdp_tensor",  # dp | fsdp | tensor | fsdp_tensor (partitioning.PRESETS)
            rules_override="",  # e.g. "embed=fsdp,mlp=tensor,heads=none,batch=data+fsdp"
        )
    )
    return c


# --------------------------------------------------------------------------- loading


SHIPPED_PREFIX = Path("share") / "t5x_like"  # where the installed package keeps the folders


def shipped(folder: str) -> Path | None:
    """The repository's top-level ``folder`` (configs, launch, tasks): next to the package in a
    checkout or editable install, else the copy a wheel installs under
    ``<prefix>/share/t5x_like/`` (pyproject's data-files); None if neither exists."""
    checkout = Path(__file__).resolve().parents[1]  # site-packages after a wheel install
    candidates = [checkout / folder] if (checkout / "pyproject.toml").is_file() else []
    candidates += [Path(prefix) / SHIPPED_PREFIX / folder
                   for prefix in (sys.prefix, site.getuserbase())]
    return next((c for c in candidates if c.is_dir()), None)


def find_config_file(path_text: str) -> Path | None:
    """``path_text`` as given, else the file of that name in the shipped ``configs/`` folder, so
    ``--config t5_span_corruption.py:base`` works from any directory."""
    path = Path(path_text)
    if path.is_file():
        return path
    configs = shipped("configs")
    if configs is None or path.is_absolute():
        return None
    inside = configs / (path.relative_to("configs") if path.parts[:1] == ("configs",) else path)
    return inside if inside.is_file() else None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]``, applies ``a.b=value`` overrides and validates the result."""
    path_text, _, arg = spec.partition(":")
    path = find_config_file(path_text)
    if path is None:
        raise UserError(
            f"config file {path_text!r} does not exist; pass e.g. "
            "--config configs/t5_span_corruption.py:tiny"
        )
    module_spec = importlib.util.spec_from_file_location(f"_t5x_like_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(f"config file {path_text} defines no get_config(arg=None) function")
        config = module.get_config(arg or None)
    except UserError:
        raise
    except Exception as e:  # a config is user code: report where it broke, in one line
        raise UserError(f"config {spec} failed to load: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config in {path_text} must return an ml_collections.ConfigDict")
    apply_overrides(config, overrides)
    validate(config)
    return config


def config_from_json(path: Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to its workdir, checked against today's schema."""
    if not path.is_file():
        raise UserError(f"{path} is missing: is {path.parent} a t5x-like workdir?")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it or pass --config") from e
    family = values.get("family", "t5") if isinstance(values, dict) else "t5"
    config = base_config(family)
    for dotted, value in _flatten(values):
        _assign(config, dotted, value)
    validate(config)
    return config


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``a.b=value`` strings (values parsed as Python literals, else kept as text)."""
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        dotted, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} has no '=': write --config.{dotted}=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        _assign(config, dotted, value)


def apply_value(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Sets ``a.b`` to ``value`` (already parsed, e.g. from a gin file) with the same checks and
    one-sentence errors as a ``--config.a.b=`` override."""
    _assign(config, dotted, value)


def flatten(values: dict) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a nested dict (a config's ``to_dict()``)."""
    return list(_flatten(values))


def _assign(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for depth, name in enumerate([*parents, leaf]):
        if name not in node:
            where = ".".join(parents[:depth]) or "the config"
            close = difflib.get_close_matches(name, list(node.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(node.keys())}"
            raise UserError(f"unknown config key {dotted!r}: {where} has no field {name!r}{hint}")
        if name != leaf:
            node = node[name]
    current = node[leaf]
    if isinstance(current, bool) and isinstance(value, str) and value in ("true", "false"):
        value = value == "true"  # --config.data.pack=true, as flags are often spelled
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and type(value) is not type(current):
        raise UserError(
            f"config field {dotted} must be {type(current).__name__} "
            f"(like {current!r}), got {type(value).__name__} {value!r}"
        )
    with node.unlocked():
        node[leaf] = value


# --------------------------------------------------------------------------- validation



def validate(c: ml_collections.ConfigDict) -> None:
    """Rejects values that would fail later, deep inside JAX, with a sentence naming the field."""
    from t5x_like.families import family_class  # late: families import models

    family_class(c.family).validate_config(c)
    d = c.data
    check(d.inputs_length >= 8, f"data.inputs_length must be >= 8, got {d.inputs_length}")
    check(d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}")
    check(not d.pack or getattr(family_class(c.family), "packs", False),
          f"data.pack=True packs fine-tuning examples; family {c.family!r} reads chunks of a "
          "token stream, which are full already: set data.pack=false")
    from t5x_like.data.vocab import VOCAB_KINDS

    check(d.vocab_kind in VOCAB_KINDS,
          f"config field data.vocab_kind={d.vocab_kind!r} is not one of {VOCAB_KINDS}")
    check(d.vocab_kind == "sentencepiece" or d.task != "shakespeare",
          f"data.vocab_kind={d.vocab_kind!r} needs a task that tokenises with it: set "
          f"data.task=shakespeare_{d.vocab_kind}s for the default corpus")
    check(d.read_threads >= 1 and d.prefetch_batches >= 1,
          f"data.read_threads ({d.read_threads}) and data.prefetch_batches "
          f"({d.prefetch_batches}) must be at least 1")
    opt = c.optimizer
    check(opt.name in OPTIMIZERS, f"optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
    check(
        opt.schedule in SCHEDULES,
        f"optimizer.schedule must be one of {SCHEDULES}, got {opt.schedule!r}",
    )
    check(
        opt.learning_rate > 0, f"optimizer.learning_rate must be positive, got {opt.learning_rate}"
    )
    check(opt.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    check(
        opt.grad_accum_steps >= 1,
        f"optimizer.grad_accum_steps must be >= 1, got {opt.grad_accum_steps}",
    )
    check(
        d.batch_size % opt.grad_accum_steps == 0,
        f"data.batch_size={d.batch_size} is not divisible by "
        f"optimizer.grad_accum_steps={opt.grad_accum_steps}",
    )
    t = c.train
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                 "steps_per_call"):
        check(t[name] > 0, f"config field train.{name} must be positive, got {t[name]}")
    check(t.eval_batches >= 0, f"train.eval_batches must be >= 0, got {t.eval_batches}")
    for name in ("checkpoint_every_minutes", "max_skipped_steps", "maintenance_poll_seconds"):
        check(t[name] >= 0, f"config field train.{name} must be >= 0, got {t[name]}")
    check(
        t.loss_spike_factor == 0 or t.loss_spike_factor > 1,
        f"train.loss_spike_factor must be 0 (off) or greater than 1, got {t.loss_spike_factor}",
    )
    for name in ("data", "fsdp", "tensor"):
        size = c.mesh[name]
        check(size == -1 or size > 0, f"mesh.{name} must be positive or -1 (fill), got {size}")
    check(
        sum(c.mesh[n] == -1 for n in ("data", "fsdp", "tensor")) <= 1,
        "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1",
    )
    for name in ("dcn_data", "dcn_fsdp"):
        size = c.mesh[name]
        check(size > 0, f"mesh.{name} must be positive (1 = one slice), got {size}")
    from t5x_like import partitioning  # late: imports jax

    partitioning.rules_from_config(c.mesh)  # unknown preset, axis or mesh axis: one sentence


# --------------------------------------------------------------------------- resolution


def resolve(c: ml_collections.ConfigDict, vocab_size: int) -> ml_collections.ConfigDict:
    """A copy with derived fields filled in; the copy is what a run writes to its workdir."""
    resolved = ml_collections.ConfigDict(c.to_dict())
    if "vocab_size" not in resolved.model:  # a model without a vocabulary (Audio BERT's)
        resolved.lock()
        return resolved
    if resolved.model.vocab_size == 0:
        resolved.model.vocab_size = int(math.ceil(vocab_size / 128) * 128)
    check(
        resolved.model.vocab_size >= vocab_size,
        f"model.vocab_size={resolved.model.vocab_size} is smaller than the vocabulary "
        f"({vocab_size} ids); set it to 0 to derive it",
    )
    resolved.lock()
    return resolved
