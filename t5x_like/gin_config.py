"""gin files as a second config language, read at the CLI's edge into the one config schema.

``--gin_file=F.gin [--gin_file=...] [--gin.BINDING=VALUE ...]`` gives the same validated
ml-collections config a ``--config`` file does; nothing is configured from afar. Statements are
read with gin's own parser (``gin.config_parser``), never executed, so T5X's ``from __gin__
import dynamic_registration`` and ``from t5x import ...`` lines need no T5X installed: an import
only names a module alias whose bindings are T5X's.

Two vocabularies of bindings:

- ours: ``SECTION.FIELD = VALUE`` for every field of the schema (``model.d_model = 512``,
  ``optimizer.learning_rate = 0.01``) and ``t5x_like.family`` / ``t5x_like.seed``;
  ``configs/gin/`` holds one file per preset of the Python configs.
- T5X's (``network.T5Config.emb_dim``, ``TASK_FEATURE_LENGTHS``, ``utils.SaveCheckpointConfig
  .period``, ...): mapped by ``t5x_like/gin_t5x.py``; one with no equivalent is listed in one
  warning. A binding that is neither names the nearest known one in its error.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import ml_collections

from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.gin_parse import REQUIRED, Parsed, parse, resolve  # noqa: F401  (re-exported)

FAMILY_KEY, SEED_KEY = "t5x_like.family", "t5x_like.seed"

# --------------------------------------------------------------------------- to the schema


@dataclasses.dataclass
class GinRun:
    """What a set of gin files asks for: the config, plus run-level values the verbs take
    (workdir, checkpoint, task, split) and the bindings that have no equivalent."""

    config: ml_collections.ConfigDict
    run: dict[str, str]
    unmapped: list[str]


def our_keys(config: ml_collections.ConfigDict) -> list[str]:
    """Every binding name of our own vocabulary for ``config``'s family."""
    keys = [FAMILY_KEY, SEED_KEY]
    for section, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += [f"{section}.{field}" for field in value.keys()]
    return keys


def _is_ours(key: str, sections: set[str]) -> bool:
    return "/" not in key and (key.split(".")[0] in sections or key in (FAMILY_KEY, SEED_KEY))


def to_config(parsed: Parsed, verb: str = "train") -> GinRun:
    """The validated config the bindings describe (T5X's mapped by ``gin_t5x``)."""
    from t5x_like import gin_t5x  # T5X's vocabulary, separate from ours

    bindings = parsed.bindings
    t5x_keys = [k for k in bindings if gin_t5x.is_t5x(k, parsed.imports)]
    family = resolve(bindings.get(FAMILY_KEY), bindings) or gin_t5x.family(parsed)
    config = config_lib.base_config(family)
    sections = {k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)}
    run: dict[str, str] = {}
    unmapped: list[str] = []
    if t5x_keys or any(k in gin_t5x.RUN_MACROS for k in bindings):
        unmapped = gin_t5x.apply(parsed, config, run, verb)
    set_by = run.pop("_set_by", {})  # our field -> the T5X binding that set it
    known = our_keys(config) + gin_t5x.known_keys()
    for key, raw in bindings.items():
        if key in t5x_keys or key == FAMILY_KEY:
            continue
        if "." not in key and "/" not in key:  # a macro: used through %NAME, or T5X's
            continue
        if not _is_ours(key, sections):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown gin binding {key!r}{hint}")
        value = resolve(raw, bindings)
        if value == REQUIRED:
            raise UserError(f"gin binding {key} is %gin.REQUIRED; set it with --gin.{key}=VALUE")
        if key == SEED_KEY:
            key = "seed"
        other = set_by.get(key)
        if other is not None:
            raise UserError(f"gin bindings {other} and {key} both set {key}; keep one")
        config_lib.apply_value(config, key, value)
    config_lib.validate(config)
    return GinRun(config, run, unmapped)


def load(files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
         verb: str = "train") -> GinRun:
    """``parse`` then ``to_config``; prints the one warning listing unmapped T5X bindings."""
    if not files and not bindings:
        raise UserError("pass --config FILE.py[:preset] or --gin_file FILE.gin")
    result = to_config(parse(files, bindings, search_paths), verb)
    if result.unmapped:
        print(f"warning: {len(result.unmapped)} T5X gin binding(s) have no t5x-like "
              f"equivalent and are not applied: {', '.join(result.unmapped)}")
    return result


def config_from_args(args: Any, overrides: Sequence[str], verb: str = "train"
                     ) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
    """A verb's config from ``--config`` or ``--gin_file``/``--gin.*`` (and ``--config.*``
    overrides applied last)."""
    gin_files = getattr(args, "gin_file", None) or []
    gin_bindings = getattr(args, "gin_bindings", None) or []
    if getattr(args, "config", None):
        if gin_files or gin_bindings:
            raise UserError("pass either --config or --gin_file, not both")
        return config_lib.load_config(args.config, overrides), {}
    result = load(gin_files, gin_bindings, getattr(args, "gin_search_paths", None) or (), verb)
    config_lib.apply_overrides(result.config, overrides)
    config_lib.validate(result.config)
    return result.config, result.run


def write_gin(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict | None = None
              ) -> str:
    """Our gin bindings for ``config``: every field that differs from ``base`` (default: the
    family's ``base_config``), so the file reads as the preset's recipe."""
    base = base if base is not None else config_lib.base_config(config.family)
    lines = [f"{FAMILY_KEY} = {config.family!r}"]
    if config.seed != base.seed:
        lines.append(f"{SEED_KEY} = {config.seed!r}")
    for section, value in config.items():
        if not isinstance(value, ml_collections.ConfigDict):
            continue
        for field, v in value.items():
            if v != base[section][field]:
                lines.append(f"{section}.{field} = {v!r}")
    return "\n".join(lines) + "\n"


def describe_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict
                         ) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (a's value, b's value)}`` where the two configs differ."""
    flat_a = dict(config_lib.flatten(a.to_dict()))
    flat_b = dict(config_lib.flatten(b.to_dict()))
    return {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k)}
