"""gin statements read with gin's own parser (``gin.config_parser``), never executed: the
shared reader of ``gin_config`` (our bindings) and ``gin_t5x`` (T5X's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gin import config_parser

from t5x_like.errors import UserError


@dataclasses.dataclass(frozen=True)
class Ref:
    """``@name`` or ``@name()``: a configurable reference, kept as its name."""

    name: str
    evaluate: bool


@dataclasses.dataclass(frozen=True)
class Macro:
    """``%NAME``, resolved after every file is read (gin's semantics: the last value wins)."""

    name: str


REQUIRED = Macro("gin.REQUIRED")


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_name: str, evaluate: bool) -> Ref:
        return Ref(scoped_name, evaluate)

    def macro(self, macro_name: str) -> Macro:
        return Macro(macro_name)


@dataclasses.dataclass
class Parsed:
    """Every binding of the files, by key ``[scope/]selector.arg`` (macros: ``NAME``), in order,
    and the module aliases the files import (their selectors are T5X's)."""

    bindings: dict[str, Any] = dataclasses.field(default_factory=dict)
    imports: set[str] = dataclasses.field(default_factory=set)
    files: list[str] = dataclasses.field(default_factory=list)

    def value(self, key: str, default: Any = None) -> Any:
        return resolve(self.bindings.get(key, default), self.bindings)


def _parse_text(text: str, where: str, parsed: Parsed, search: Sequence[Path], depth: int) -> None:
    try:
        statements = list(config_parser.ConfigParser(text, _Delegate()))
    except SyntaxError as e:
        raise UserError(f"{where} line {e.lineno}: gin syntax error: {e.msg}") from None
    for s in statements:
        if isinstance(s, config_parser.ImportStatement):
            module = s.module
            parsed.imports.add(s.alias or module.rsplit(".", 1)[-1])
        elif isinstance(s, config_parser.IncludeStatement):
            _parse_file(_find_include(s.filename, where, search), parsed, search, depth + 1)
        elif isinstance(s, config_parser.BindingStatement):
            key = s.selector if not s.arg_name else f"{s.selector}.{s.arg_name}"
            parsed.bindings[f"{s.scope}/{key}" if s.scope else key] = s.value


def _find_include(name: str, where: str, search: Sequence[Path]) -> Path:
    """An included file: relative to the including file, then each search path, then the
    working directory (T5X's ``--gin_search_paths``), then by its last parts (``t5x/examples/
    t5/t5_1_1/base.gin`` found as ``t5_1_1/base.gin`` or ``base.gin`` beside the includer)."""
    here = Path(where).parent if where != "--gin" else Path.cwd()
    parts = Path(name).parts
    for base in (here, *search, Path.cwd()):
        for k in range(len(parts)):
            candidate = base.joinpath(*parts[k:])
            if candidate.is_file():
                return candidate
    raise UserError(f"{where} includes {name!r}, which is not beside it nor under any "
                    "--gin_search_paths folder; pass the folder that holds it")


def _parse_file(path: Path, parsed: Parsed, search: Sequence[Path], depth: int = 0) -> None:
    if depth > 20:
        raise UserError(f"gin includes nest more than 20 deep at {path}; is there a cycle?")
    if not path.is_file():
        raise UserError(f"gin file {path} does not exist")
    parsed.files.append(str(path))
    _parse_text(path.read_text(), str(path), parsed, search, depth)


def parse(files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()) -> Parsed:
    """Reads ``files`` in order, then ``bindings`` (``KEY=VALUE`` strings), as gin would."""
    parsed = Parsed()
    search = [Path(p) for p in search_paths]
    for name in files:
        _parse_file(Path(name), parsed, search)
    for item in bindings:
        key, sep, text = item.removeprefix("--").removeprefix("gin.").partition("=")
        if not sep:
            raise UserError(f"gin binding {item!r} has no '=': write --gin.{key}=VALUE")
        try:
            _parse_text(f"{key.strip()} = {text}", "--gin", parsed, search, 0)
        except UserError:  # a bare word or path, as --config.a.b=VALUE takes it: a string
            _parse_text(f"{key.strip()} = {text!r}", "--gin", parsed, search, 0)
    return parsed


def resolve(value: Any, bindings: dict[str, Any], depth: int = 0) -> Any:
    """``value`` with every ``%MACRO`` replaced by the macro's final value."""
    if depth > 50:
        raise UserError("gin macros refer to each other in a cycle")
    if isinstance(value, Macro):
        if value == REQUIRED:
            return REQUIRED
        if value.name not in bindings:
            raise UserError(f"gin macro %{value.name} is used but never set; add "
                            f"--gin.{value.name}=VALUE")
        return resolve(bindings[value.name], bindings, depth + 1)
    if isinstance(value, list | tuple):
        return type(value)(resolve(v, bindings, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: resolve(v, bindings, depth + 1) for k, v in value.items()}
    return value
