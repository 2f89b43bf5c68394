"""Hugging Face checkpoints (config.json + safetensors) <-> our models, for every architecture.

``load`` reads ``model_type`` from config.json and hands the folder to the module that knows
that architecture; ``export`` picks the module by the config's class. An architecture module
(``hf_t5``, ...) defines ``MODEL_TYPES``, ``CONFIG_CLASS``, ``load_folder(path, hf_config,
**overrides)`` and ``export(model, config, out_dir)``; adding one is a new file plus one line in
``ARCHITECTURES``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from t5x_like.errors import UserError
from t5x_like.interop import hf_common

ARCHITECTURES = (
    "t5x_like.interop.hf_t5",
    "t5x_like.interop.hf_gpt2",
    "t5x_like.interop.hf_bart",
    "t5x_like.interop.hf_xlnet",
    "t5x_like.interop.hf_longformer",
    "t5x_like.interop.hf_transfo_xl",
    "t5x_like.interop.hf_reformer",
    "t5x_like.interop.hf_encoder",
    "t5x_like.interop.hf_mobilebert",
)


def _modules():
    return [importlib.import_module(name) for name in ARCHITECTURES]


def supported_model_types() -> list[str]:
    return sorted(t for m in _modules() for t in m.MODEL_TYPES)


def load(path: str | Path, **overrides: Any):
    """(model, config) from a transformers folder; ``overrides`` set our own config fields
    (``scan_layers``, ``dtype``, ``remat_policy``, ...)."""
    path = hf_common.require_folder(path)
    hf_config = hf_common.read_json(path / hf_common.CONFIG_FILE)
    model_type = hf_config.get("model_type", "t5")
    for module in _modules():
        if model_type in module.MODEL_TYPES:
            return module.load_folder(path, hf_config, **overrides)
    raise UserError(f"{path / hf_common.CONFIG_FILE} has model_type={model_type!r}; t5x-like "
                    f"imports {supported_model_types()}")


def export(model, config, out_dir: str | Path) -> Path:
    """Writes config.json + model.safetensors that transformers loads."""
    for module in _modules():
        if isinstance(config, module.CONFIG_CLASS):
            return module.export(model, config, out_dir)
    raise UserError(f"no Hugging Face export for {type(config).__name__}")
