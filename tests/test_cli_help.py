"""What ``t5x-like --help`` tells a user: every verb says what it does, and import-hf names
exactly the model types the Hugging Face interop reads (``interop.hf.supported_model_types``,
the registry the conversion itself dispatches on), so the help cannot fall behind a new
architecture."""

from __future__ import annotations

import argparse
import re

import pytest

from t5x_like import cli
from t5x_like.interop import hf


def _verb_help() -> dict[str, str]:
    """Each verb's one-line help, as ``t5x-like --help`` lists it."""
    parser = cli.build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: " ".join(a.help.split()) for a in verbs._choices_actions}


def test_top_level_help_lists_every_verb_with_a_sentence(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    helps = _verb_help()
    assert {"train", "eval", "infer", "tasks", "vocab", "import-hf", "export-hf", "bench",
            "compress-report", "report"} <= set(helps)
    for verb, text in helps.items():
        assert len(text.split()) >= 4, f"{verb}: {text!r}"
        assert f"{verb} {text}" in shown, verb


def test_import_hf_help_names_exactly_the_supported_model_types():
    text = _verb_help()["import-hf"]
    named = set(re.split(r",\s*|\s+or\s+", cli.HF_MODEL_TYPES))
    assert named == set(hf.supported_model_types())
    for model_type in hf.supported_model_types():
        assert re.search(rf"(?<![\w-]){re.escape(model_type)}(?![\w-])", text), model_type
    # export-hf defers to import-hf's list instead of naming a narrower one ("T5 folder").
    assert "any model import-hf reads" in _verb_help()["export-hf"]
