"""``import-hf`` / ``export-hf``: Hugging Face folders <-> t5x-like workdirs, any architecture.

A workdir made by import-hf is an ordinary run at step 0 (config.json + an orbax checkpoint),
so ``train`` continues pretraining from it and ``eval``/``infer``/``export-hf`` read it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from t5x_like import config as config_lib
from t5x_like import storage
from t5x_like.checkpoints import Checkpoints
from t5x_like.data.vocab import is_hf_tokenizer
from t5x_like.errors import UserError
from t5x_like.experiment import build
from t5x_like.interop import hf

HF_VOCAB_FILE = "spiece.model"
# Tokenizer files of non-SentencePiece checkpoints, copied so the workdir is self-contained.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                      "merges.txt")


def family_for(model_config) -> str:
    """The family named by the checkpoint's ``model_type`` (bert, roberta, albert, electra) when
    it trains this config class, else the first registered family that does."""
    from t5x_like.families import FAMILIES, family_class

    preferred = getattr(model_config, "model_type", None)
    for name in ([preferred] if preferred in FAMILIES else []) + list(FAMILIES):
        if isinstance(model_config, family_class(name).config_class):
            return name
    raise UserError(f"no family trains a {type(model_config).__name__}; the checkpoint can be "
                    "loaded with t5x_like.interop.hf.load but not imported as a run")


def import_hf(src: str | Path, out: str | Path, overrides=()) -> Path:
    """Writes ``out/config.json`` and ``out/checkpoints/0`` from a Hugging Face folder."""
    src, out = storage.as_path(src), storage.as_path(out)  # local folders or gs://
    if (out / "checkpoints").exists():
        raise UserError(f"{out} already holds checkpoints; choose an empty output folder")
    model, model_config = hf.load(src)
    config = config_lib.base_config(family_for(model_config))
    fields = dataclasses.asdict(model_config)
    with config.model.unlocked():
        config.model.update({k: v for k, v in fields.items() if k in config.model})
    out.mkdir(parents=True, exist_ok=True)
    if (src / HF_VOCAB_FILE).is_file():
        storage.write_atomically(out / HF_VOCAB_FILE, (src / HF_VOCAB_FILE).read_bytes())
        config.data.vocab_path = str(storage.absolute(out / HF_VOCAB_FILE))
    else:
        copied = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()]
        for name in copied:
            storage.write_atomically(out / name, (src / name).read_bytes())
        # A family that trains on the checkpoint's own tokenizer (BART) reads it from out.
        from t5x_like.families import family_class

        if copied and getattr(family_class(config.family), "trains_with_hf_tokenizer", False):
            config.data.vocab_path = str(storage.absolute(out))
        else:
            where = f"its tokenizer files ({', '.join(copied)}) are copied to {out}; " \
                if copied else ""
            print(f"note: {src} has no {HF_VOCAB_FILE}; {where}training uses data.vocab_path "
                  "(default: the default vocabulary, whose ids differ from the model's)")
    config_lib.apply_overrides(config, [o.removeprefix("--") for o in overrides])
    config_lib.validate(config)
    if config.model.scan_layers != model_config.scan_layers:  # the layout of the layer params
        model, model_config = hf.load(src, scan_layers=config.model.scan_layers)
    exp = build(config)
    exp.write_config(out)
    state = exp.init_state()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    imported = jax.device_put(params, exp.state_shardings["params"])
    state = {**state, "params": imported, "opt_state": exp.tx.init(imported)}
    checkpoints = Checkpoints(out)
    checkpoints.save(0, state, {"batches_consumed": 0, "step": 0, "imported_from": str(src)})
    checkpoints.close()
    return out


def export_hf(workdir: str | Path, out: str | Path) -> Path:
    """Writes config.json + model.safetensors (+ the vocabulary) that transformers loads."""
    from t5x_like.evaluation.driver import load_checkpoint

    exp, params, _ = load_checkpoint(workdir)
    out = storage.as_path(out)
    hf.export(exp.family.model(jax.device_get(params)), exp.family.model_config, out)
    vocab_file = getattr(exp.vocabulary, "sentencepiece_model_file", None)
    if vocab_file and storage.as_path(vocab_file).is_file():
        storage.write_atomically(out / HF_VOCAB_FILE, storage.as_path(vocab_file).read_bytes())
    vocab_path = exp.config.data.vocab_path
    if vocab_path and is_hf_tokenizer(vocab_path):  # a Hugging Face tokenizer goes along
        folder = storage.as_path(vocab_path)
        folder = folder if folder.is_dir() else folder.parent
        for name in HF_TOKENIZER_FILES:
            if (folder / name).is_file():
                storage.write_atomically(out / name, (folder / name).read_bytes())
    return out
