"""Shared test settings: a persistent vocabulary cache, quiet TensorFlow, a tiny T5 recipe."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The default 8k vocabulary is trained once and reused by every test (and every run) here.
os.environ.setdefault("T5X_LIKE_CACHE", str(ROOT / ".cache" / "t5x_like"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# libtpu is installed (the pod rehearsal compiles for TPU topologies), so JAX would try, and
# log a failure to open, a TPU on this CPU host: tests run on CPU unless told otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session: the xdist workers and every process a
# test starts (CLI runs, 8-device scripts) inherit it, so a program one of them compiled is read
# back by the next, as a user's resumed run reads its own. The executables are the same either
# way; only compile time goes. Module fixtures may point JAX at a cache of their own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="t5x_like_tests_xla_cache_")
    atexit.register(shutil.rmtree, _xla_cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

TINY_CONFIG = "configs/t5_span_corruption.py:tiny"
# A model small enough that a training step takes milliseconds on one CPU core.
TINY_OVERRIDES = [
    "--config.model.d_model=32",
    "--config.model.d_kv=8",
    "--config.model.num_heads=4",
    "--config.model.d_ff=64",
    "--config.model.num_encoder_layers=1",
    "--config.model.num_decoder_layers=1",
    "--config.data.inputs_length=32",
    "--config.data.batch_size=8",
    "--config.train.num_steps=20",
    "--config.train.log_every=1",
    "--config.train.eval_every=10",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=10",
    "--config.train.progress_bar=False",
    "--config.optimizer.warmup_steps=5",
]


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``t5x-like ARGS`` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "t5x_like.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny_config():
    from t5x_like import config as config_lib

    os.chdir(ROOT)
    return config_lib.load_config(TINY_CONFIG, [o.removeprefix("--") for o in TINY_OVERRIDES])
