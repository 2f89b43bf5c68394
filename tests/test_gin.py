"""gin files as a second config language: ours (configs/gin/) and T5X's (tests/data/gin_t5x/,
written in T5X's syntax with the bindings of T5X's T5 1.1 model and run files)."""

from pathlib import Path

import pytest
from conftest import run_cli

from t5x_like import config as config_lib
from t5x_like import gin_config
from t5x_like.errors import UserError

ROOT = Path(__file__).parent.parent
T5X = Path(__file__).parent / "data" / "gin_t5x"
PRESETS = [(recipe, preset) for recipe in ("t5_span_corruption", "t5_finetune")
           for preset in ("tiny", "small", "base", "large")]

# What T5X's files set that our presets do not, and the same for every size.
T5X_MODEL = {"model.vocab_size": (32128, 0), "model.dtype": ("bfloat16", "float32"),
             "data.vocab_path": ("gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model",
                                 "")}
PRETRAIN_RUN = {"train.checkpoint_every": (1000, 5000), "train.eval_every": (1000, 5000),
                "train.eval_batches": (20, 8)}
FINETUNE_RUN = {"train.eval_every": (1000, 5000), "train.eval_batches": (20, 8),
                "finetune.init_checkpoint": ("runs/t5_large", "")}


@pytest.mark.parametrize("recipe,preset", PRESETS)
def test_shipped_gin_file_equals_its_preset(recipe, preset):
    gin = gin_config.load([str(ROOT / "configs" / "gin" / f"{recipe}_{preset}.gin")]).config
    ours = config_lib.load_config(str(ROOT / "configs" / f"{recipe}.py:{preset}"))
    assert gin_config.describe_differences(gin, ours) == {}
    assert gin.to_dict() == ours.to_dict()


def test_every_preset_has_a_gin_twin():
    shipped = {p.stem for p in (ROOT / "configs" / "gin").glob("*.gin")}
    assert shipped == {f"{recipe}_{preset}" for recipe, preset in PRESETS}


def test_our_gin_file_takes_bindings_and_t5x_macros():
    gin_file = str(ROOT / "configs" / "gin" / "t5_span_corruption_small.gin")
    result = gin_config.load([gin_file], ["DROPOUT_RATE=0.05", "optimizer.learning_rate=0.02"])
    preset = config_lib.load_config(str(ROOT / "configs" / "t5_span_corruption.py:small"))
    assert gin_config.describe_differences(result.config, preset) == {
        "model.dropout_rate": (0.05, 0.0), "optimizer.learning_rate": (0.02, 0.01)}
    # the file sets train.num_steps itself: a T5X macro for the same field is a conflict
    with pytest.raises(UserError, match="TRAIN_STEPS and train.num_steps both set"):
        gin_config.load([gin_file], ["TRAIN_STEPS=7"])


def _t5x(size: str, run: str, *bindings: str, verb: str = "train") -> gin_config.GinRun:
    files = [str(T5X / "t5_1_1" / f"{size}.gin"), str(T5X / "run_files" / f"{run}.gin")]
    return gin_config.load(files, list(bindings), verb=verb)


PRETRAIN = ("MIXTURE_OR_TASK_NAME='shakespeare'",
            "TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}", "TRAIN_STEPS=524288",
            "MODEL_DIR='runs/t5'", "DROPOUT_RATE=0.0")


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_t5x_pretrain_files_resolve_to_our_preset(size, capsys):
    result = _t5x(size, "pretrain", *PRETRAIN)
    preset = config_lib.load_config(str(ROOT / "configs" / f"t5_span_corruption.py:{size}"))
    # T5X's files set no remat policy; our large preset keeps only matmul outputs (scanned).
    remat = {"model.remat_policy": ("none", "dots")} if size == "large" else {}
    assert gin_config.describe_differences(result.config, preset) == {
        **T5X_MODEL, **PRETRAIN_RUN, **remat}
    assert result.run == {"workdir": "runs/t5"}
    # one warning lists what has no equivalent, never dropped in silence
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1
    for name in ("train/utils.DatasetConfig.use_cached=True", "utils.SaveCheckpointConfig.keep"):
        assert name in warning[0]


def test_t5x_finetune_files_resolve_to_our_preset():
    result = _t5x("large", "finetune", "MIXTURE_OR_TASK_NAME='play_lines'",
                  "TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 8}", "TRAIN_STEPS=262144",
                  "MODEL_DIR='runs/ft'", "INITIAL_CHECKPOINT_PATH='runs/t5_large'")
    preset = config_lib.load_config(str(ROOT / "configs" / "t5_finetune.py:large"))
    assert result.config.family == "t5_finetune"
    assert gin_config.describe_differences(result.config, preset) == {**T5X_MODEL, **FINETUNE_RUN}


def test_t5x_bindings_move_our_fields():
    result = _t5x("small", "pretrain", *PRETRAIN, "BATCH_SIZE=64",
                  "partitioning.PjitPartitioner.num_partitions=2",
                  "utils.SaveCheckpointConfig.period=250", "network.T5Config.dtype='float32'",
                  "utils.create_learning_rate_scheduler.base_learning_rate=2.0")
    c = result.config
    assert (c.data.batch_size, c.mesh.tensor, c.train.checkpoint_every) == (64, 2, 250)
    assert c.model.dtype == "float32"
    # T5X's rsqrt_decay: base / sqrt(max(step, warmup)) = our peak 2.0 / sqrt(10000) at warm-up
    assert (c.optimizer.schedule, c.optimizer.warmup_steps) == ("rsqrt", 10000)
    assert c.optimizer.learning_rate == pytest.approx(0.02)


def test_t5x_eval_file_names_checkpoint_task_and_split():
    run = _t5x("base", "eval", "MIXTURE_OR_TASK_NAME='glue_sst2_v2'", "CHECKPOINT_PATH='runs/x'",
               "EVAL_OUTPUT_DIR='runs/x/eval'", verb="eval").run
    assert run == {"checkpoint": "runs/x", "task": "glue_sst2_v2", "split": "test",
                   "output_dir": "runs/x/eval"}


@pytest.mark.parametrize("bindings,message", [
    (["modle.d_model=64"], "unknown gin binding 'modle.d_model'; did you mean 'model.d_model'"),
    (["model.d_modle=64"], "did you mean 'd_model'"),
    (["network.T5Config.emb_dims=64"], "did you mean T5Config.emb_dim"),
    (["model.remat_policy=3"], "model.remat_policy must be str"),
    (["utils.create_learning_rate_scheduler.factors='constant * linear_warmup * rsqrt_decay'"],
     "has no t5x-like equivalent"),
])
def test_bad_bindings_stop_in_one_sentence(bindings, message):
    files = [str(T5X / "t5_1_1" / "small.gin"), str(T5X / "run_files" / "pretrain.gin")]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("*", r"\*")):
        gin_config.load(files, [*PRETRAIN, *bindings])


def test_required_binding_left_unset_names_the_flag():
    with pytest.raises(UserError, match=r"TRAIN_STEPS is %gin.REQUIRED.*--gin.TRAIN_STEPS="):
        _t5x("small", "pretrain", *[b for b in PRETRAIN if not b.startswith("TRAIN_STEPS")])


def test_cli_takes_gin_files_and_bindings(tmp_path):
    """The verb reads --gin_file/--gin.*; a bad binding stops before anything compiles."""
    gin_file = ROOT / "configs" / "gin" / "t5_span_corruption_tiny.gin"
    result = run_cli("train", f"--gin_file={gin_file}",
                     "--workdir", str(tmp_path / "run"), "--gin.train.num_stesp=5")
    assert result.returncode == 2
    assert "unknown config key 'train.num_stesp'" in result.stderr
    assert "did you mean 'num_steps'" in result.stderr


@pytest.mark.slow  # a real (tiny) training run from T5X's files through the CLI: ~1-2 min
def test_cli_trains_from_t5x_gin_files(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", f"--gin_file={T5X / 't5_1_1' / 'small.gin'}",
                     f"--gin_file={T5X / 'run_files' / 'pretrain.gin'}",
                     "--gin.MIXTURE_OR_TASK_NAME=shakespeare",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}",
                     "--gin.TRAIN_STEPS=2", "--gin.DROPOUT_RATE=0.0", f"--gin.MODEL_DIR={workdir}",
                     "--gin.BATCH_SIZE=4", "--gin.network.T5Config.emb_dim=64",
                     "--gin.network.T5Config.num_encoder_layers=2",
                     "--gin.network.T5Config.num_decoder_layers=2",
                     "--gin.network.T5Config.mlp_dim=128",
                     "--gin.seqio.SentencePieceVocabulary.sentencepiece_model_file=''",
                     "--gin.train_script.train.eval_period=2",
                     "--gin.train_script.train.eval_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    written = config_lib.config_from_json(workdir / "config.json")
    assert (written.model.d_model, written.model.dtype, written.train.num_steps) == (
        64, "bfloat16", 2)
    assert (workdir / "checkpoints" / "2").is_dir()
