"""Configs: every shipped file loads, and every mistake is one sentence naming the field."""

from pathlib import Path

import pytest
from conftest import ROOT, TINY_CONFIG, run_cli

from t5x_like import config as config_lib
from t5x_like.errors import UserError

CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def _keys(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_every_shipped_config_loads_and_validates(path, preset):
    """Every file has the three common presets, locked, with exactly its family's schema."""
    config = config_lib.load_config(f"{path}:{preset}")
    assert config.is_locked
    assert set(_keys(config)) == set(_keys(config_lib.base_config(config.family)))


def test_presets_follow_t5_v1_1_sizes():
    base = config_lib.load_config(f"{ROOT}/configs/t5_span_corruption.py:base")
    assert (base.model.d_model, base.model.num_heads, base.model.d_ff) == (768, 12, 2048)
    assert (base.model.num_encoder_layers, base.data.inputs_length) == (12, 512)
    large = config_lib.load_config(f"{ROOT}/configs/t5_span_corruption.py:large")
    assert (large.model.d_model, large.model.num_heads, large.model.d_ff) == (1024, 16, 2816)
    # Unrolled up to 12 layers a stack, as T5X's T5; large scans (compile time) and keeps only
    # matmul outputs (a scanned stack's kept activations are zero-filled stacked buffers).
    assert not base.model.scan_layers and large.model.scan_layers
    assert (base.model.remat_policy, large.model.remat_policy) == ("none", "dots")
    assert base.train.steps_per_call == large.train.steps_per_call == 10


def test_overrides_parse_python_literals_and_text():
    config = config_lib.load_config(
        f"{ROOT}/{TINY_CONFIG}",
        ["model.d_model=64", "model.dtype=bfloat16", "optimizer.learning_rate=3", "seed=7"],
    )
    assert config.model.d_model == 64 and config.model.dtype == "bfloat16"
    assert config.optimizer.learning_rate == 3.0 and isinstance(
        config.optimizer.learning_rate, float
    )
    assert config.seed == 7


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.d_modle=64", ["unknown config key", "d_modle", "did you mean 'd_model'"]),
        ("model.d_model=wide", ["model.d_model must be int", "'wide'"]),
        ("model.d_model=-4", ["model.d_model must be positive"]),
        ("model.scan_unroll=-1", ["scan_unroll=-1 must be a non-negative integer"]),
        ("optimizer.name=sgd", ["optimizer.name must be one of"]),
        ("data.batch_size=10", ["not divisible by optimizer.grad_accum_steps"]),
        ("mesh.data=0", ["mesh.data must be positive or -1"]),
        ("nonsense", ["has no '='"]),
    ],
)
def test_bad_overrides_name_the_field(override, words):
    extra = ["optimizer.grad_accum_steps=4"] if "batch_size" in override else []
    with pytest.raises(UserError) as info:
        config_lib.load_config(f"{ROOT}/{TINY_CONFIG}", [*extra, override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "nope.py"))


def test_unknown_preset_is_reported():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        config_lib.load_config(f"{ROOT}/configs/t5_span_corruption.py:huge")


def test_config_json_round_trip(tmp_path: Path):
    config = config_lib.load_config(f"{ROOT}/{TINY_CONFIG}", ["model.d_model=48"])
    resolved = config_lib.resolve(config, vocab_size=8100)
    assert resolved.model.vocab_size == 8192  # rounded up to a multiple of 128
    path = tmp_path / "config.json"
    path.write_text(resolved.to_json())
    assert config_lib.config_from_json(path).to_dict() == resolved.to_dict()


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    result = run_cli(
        "train",
        "--config",
        TINY_CONFIG,
        "--workdir",
        str(tmp_path / "w"),
        "--config.model.num_heads=zero",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config field model.num_heads must be int (like 4), got str 'zero'"
    ]
    assert not (tmp_path / "w").exists()  # nothing written before the config is valid
