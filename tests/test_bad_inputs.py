"""Every bad config and bad data input a user can make stops with one sentence that names it.

The matrix runs in-process (config_lib, the data readers and the CLI's ``main``), so it is
fast; each row is the mistake and the start of the message the user must see.
"""

import re
import textwrap

import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES

from t5x_like import config as config_lib
from t5x_like.errors import UserError

TINY = [o.removeprefix("--") for o in TINY_OVERRIDES]

# (override, regex the one-line message must match)
BAD_OVERRIDES = [
    ("train.num_step=5", r"unknown config key 'train.num_step'.*did you mean 'num_steps'\?"),
    ("modle.d_model=4", r"unknown config key 'modle.d_model': the config has no field 'modle'"),
    ("train.num_steps=ten", r"config field train.num_steps must be int .*got str 'ten'"),
    ("train.progress_bar=1", r"config field train.progress_bar must be bool"),
    ("optimizer.learning_rate='fast'", r"optimizer.learning_rate must be float"),
    ("train.num_steps", r"override 'train.num_steps' has no '='"),
    ("data.batch_size=0", r"data.batch_size must be positive, got 0"),
    ("data.inputs_length=4", r"data.inputs_length must be >= 8, got 4"),
    ("optimizer.name='sgd'", r"optimizer.name must be one of \('adafactor', 'adamw', 'lamb'\)"),
    ("optimizer.schedule='step'", r"optimizer.schedule must be one of"),
    ("optimizer.learning_rate=0.0", r"optimizer.learning_rate must be positive, got 0.0"),
    ("optimizer.learning_rate=-1e-3", r"optimizer.learning_rate must be positive"),
    ("optimizer.warmup_steps=-1", r"optimizer.warmup_steps must be >= 0, got -1"),
    ("optimizer.grad_accum_steps=0", r"optimizer.grad_accum_steps must be >= 1, got 0"),
    ("optimizer.grad_accum_steps=3", r"data.batch_size=8 is not divisible by .*=3"),
    ("train.num_steps=0", r"config field train.num_steps must be positive, got 0"),
    ("train.log_every=0", r"config field train.log_every must be positive, got 0"),
    ("train.eval_every=-5", r"config field train.eval_every must be positive, got -5"),
    ("train.checkpoint_every=0", r"config field train.checkpoint_every must be positive"),
    ("train.keep_checkpoints=0", r"config field train.keep_checkpoints must be positive"),
    ("train.eval_batches=-1", r"train.eval_batches must be >= 0, got -1"),
    ("train.checkpoint_every_minutes=-1.0", r"train.checkpoint_every_minutes must be >= 0"),
    ("train.max_skipped_steps=-1", r"train.max_skipped_steps must be >= 0, got -1"),
    ("train.loss_spike_factor=0.5", r"train.loss_spike_factor must be 0 \(off\) or greater"),
    ("train.maintenance_poll_seconds=-2.0", r"train.maintenance_poll_seconds must be >= 0"),
    ("mesh.data=0", r"mesh.data must be positive or -1 \(fill\), got 0"),
    ("mesh.fsdp=-1", r"at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    ("mesh.rules='zero'", r"mesh.rules must be one of"),
    ("model.d_model=0", r"config field model.d_model must be positive, got 0"),
    ("model.num_heads=-2", r"config field model.num_heads must be positive"),
    ("model.dropout_rate=1.0", r"model.dropout_rate must be in \[0, 1\), got 1.0"),
    ("model.vocab_size=-1", r"model.vocab_size must be >= 0, got -1"),
    ("model.dtype='float8'", r"T5 config field dtype='float8' is not one of"),
    ("model.remat_policy='some'", r"T5 config field remat_policy='some' is not one of"),
    ("objective.noise_density=0.0", r"objective.noise_density must be in \(0, 1\)"),
    ("objective.mean_noise_span_length=0.5", r"objective.mean_noise_span_length must be >= 1"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_sentence(override, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError) as info:
        config_lib.load_config(TINY_CONFIG, [*TINY, override])
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text


CONFIG_FILES = [
    ("missing.py", None, r"config file '.*missing.py' does not exist; pass e.g."),
    ("no_get_config.py", "X = 1\n", r"defines no get_config\(arg=None\) function"),
    ("raises.py", "def get_config(arg=None):\n    return 1 / 0\n",
     r"failed to load: ZeroDivisionError: division by zero"),
    ("syntax.py", "def get_config(arg=None)\n", r"failed to load: SyntaxError"),
    ("not_dict.py", "def get_config(arg=None):\n    return {'a': 1}\n",
     r"must return an ml_collections.ConfigDict"),
]


@pytest.mark.parametrize("name,body,message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file_is_one_sentence(name, body, message, tmp_path):
    path = tmp_path / name
    if body is not None:
        path.write_text(body)
    with pytest.raises(UserError, match=message) as info:
        config_lib.load_config(str(path))
    assert "\n" not in str(info.value)


def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys, monkeypatch):
    """The path a user sees: `t5x-like train` with a bad field, in-process through main()."""
    from t5x_like.cli import main

    monkeypatch.chdir(ROOT)
    argv = ["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "w"), *TINY_OVERRIDES]
    assert main([*argv, "--config.train.max_skipped_steps=-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config field train.max_skipped_steps must be >= 0, got -3"]
    assert not (tmp_path / "w").exists()  # nothing was written for a config that cannot run


# --------------------------------------------------------------------------- bad data


def _read(path):
    from t5x_like.data import corpus

    return list(corpus.read_text_source(path))


def _giant_line(path):
    from t5x_like.data.corpus import MAX_LINE_BYTES

    path.write_bytes(b"x" * (MAX_LINE_BYTES + 10) + b"\n")


BAD_TEXT = [
    ("missing", None, r"text source .*nowhere.txt does not exist; pass a .txt file or a folder"),
    ("no_txt_folder", "folder", r"holds no .txt files; add some or point at a file"),
    ("only_blank", b"\n   \n\t\n",
     r"contains no text \(skipped lines: 3 blank \(empty documents\)\)"),
    ("only_not_utf8", b"\xff\xfe bad\n\xc3\x28\n",
     r"contains no text \(skipped lines: 2 not valid UTF-8\)"),
    ("only_giant_line", _giant_line, r"contains no text \(skipped lines: 1 longer than 1048576"),
    ("empty_file", b"", r"contains no text; it needs non-blank UTF-8 lines"),
]


@pytest.mark.parametrize("name,content,message", BAD_TEXT, ids=[b[0] for b in BAD_TEXT])
def test_unusable_text_source_is_one_sentence(name, content, message, tmp_path):
    path = tmp_path / ("nowhere.txt" if content is None else f"{name}.txt")
    if content == "folder":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "notes.md").write_text("not a .txt file\n")
    elif callable(content):
        content(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        _read(path)
    assert "\n" not in str(info.value)


def test_bad_lines_are_skipped_counted_and_reported(tmp_path):
    """Good lines survive, bad ones are counted per reason; a truncated file's cut-off
    multi-byte character is one more undecodable line, not a crash."""
    from t5x_like.data import corpus

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"first good line\n\n\xff broken\nsecond good line\n")
    _giant_line(folder / "b.txt")
    with open(folder / "b.txt", "ab") as f:
        f.write(b"after the giant line\n")
    # A file cut in the middle of "é" (0xC3 0xA9): its last line is not UTF-8 any more.
    (folder / "c.txt").write_bytes("whole line\ncaf\u00e9".encode()[:-1])
    lines = _read(folder)
    assert lines == ["first good line", "second good line", "after the giant line", "whole line"]
    assert corpus.SKIPPED[str(folder)] == {"not_utf8": 2, "blank": 1, "too_long": 1}
    report = [line for line in corpus.data_report_lines() if str(folder) in line]
    assert report == [
        f"data: text source {folder}: skipped lines: 2 not valid UTF-8, 1 blank (empty "
        "documents), 1 longer than 1048576 bytes"
    ]


def _text_task(name, path, **kwargs):
    from t5x_like.tasks import register_text_task

    return register_text_task(name, str(path), **kwargs)


def test_text_smaller_than_one_batch_is_one_sentence(tmp_path):
    from t5x_like.data.pipeline import raw_token_batches

    (tmp_path / "small.txt").write_text("only a few words here\n")
    _text_task("bad_inputs_small", tmp_path / "small.txt", validation_fraction=None)
    with pytest.raises(UserError, match=r"holds \d chunk\(s\) of 32 tokens, fewer tokens than "
                       r"one batch of 8 x 32; add text, lower data.batch_size"):
        raw_token_batches("bad_inputs_small", split="train", raw_length=32, batch_size=8, seed=0)


@pytest.mark.parametrize("task,split,message", [
    ("shakespear", "train", r"no task or mixture named 'shakespear' is registered; did you mean "
                            r"shakespeare, shakespeare_chars, shakespeare_bytes\?"),
    ("shakespeare", "test", r"task 'shakespeare' has no split 'test'; it has train, validation"),
])
def test_unknown_task_or_split_is_one_sentence(task, split, message):
    from t5x_like.data.pipeline import raw_token_batches

    with pytest.raises(UserError, match=message):
        raw_token_batches(task, split=split, raw_length=32, batch_size=2, seed=0)


@pytest.mark.parametrize("source,fraction,message", [
    ("tfds:lm1b", 0.02, r"TFDS source 'tfds:lm1b' needs a version: write tfds:NAME/CONFIG:VERSION"),
    ("tfds:lm1b:1.1.0", 1.5, r"validation_fraction for task 'bad_frac' must be in \(0, 1\)"),
])
def test_bad_task_registration_is_one_sentence(source, fraction, message):
    with pytest.raises(UserError, match=message):
        _text_task("bad_frac", source, validation_fraction=fraction)


def test_missing_vocabulary_file_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match=r"vocabulary file .*absent.model does not exist; fix "
                       r"data.vocab_path"):
        config = config_lib.load_config(
            TINY_CONFIG, [*TINY, f"data.vocab_path='{tmp_path / 'absent.model'}'"]
        )
        from t5x_like.experiment import build

        build(config)


def _tfrecord_task(tmp_path, name, lines_per_file=200):
    """A seqio task over two TFRecord shards of tf.Examples (the format of prepared corpora)."""
    import seqio
    import tensorflow as tf

    from t5x_like.tasks.pretraining import _register

    files = []
    for shard in range(2):
        path = tmp_path / f"{name}-{shard:05d}-of-00002.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i in range(lines_per_file):
                text = f"shard {shard} line {i}: to be or not to be, that is the question"
                example = tf.train.Example(features=tf.train.Features(feature={
                    "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
                }))
                writer.write(example.SerializeToString())
        files.append(path)
    source = seqio.TFExampleDataSource(
        {"train": [str(f) for f in files]},
        feature_description={"text": tf.io.FixedLenFeature([], tf.string)},
    )
    _register(name, source, None, "text", "test shards")
    return files


@pytest.mark.parametrize("damage,error", [
    ("missing", "NotFoundError"),
    ("truncated", "DataLossError"),
])
def test_missing_or_truncated_shard_is_one_sentence(damage, error, tmp_path):
    """The second of two shards is deleted or cut short after the task was registered: the
    first batches come from shard 0, then the stream stops with a sentence naming the task."""
    from t5x_like.data.pipeline import raw_token_batches

    name = f"bad_shards_{damage}"
    files = _tfrecord_task(tmp_path, name)
    if damage == "missing":
        files[1].unlink()
    else:
        files[1].write_bytes(files[1].read_bytes()[: files[1].stat().st_size // 2 + 7])
    batches = raw_token_batches(name, split="train", raw_length=32, batch_size=4, seed=0,
                                shuffle=False, repeat=False)
    consumed = []
    with pytest.raises(UserError) as info:
        for batch in batches:
            consumed.append(batch["tokens"].shape)
    assert consumed and set(consumed) == {(4, 32)}  # shard 0's batches arrived whole first
    text = str(info.value)
    assert "\n" not in text
    assert re.match(rf"reading split 'train' of task '{name}' failed: {error}: .*a data file is "
                    r"missing, truncated or damaged", text), text


CONFIG_WITH_TASK = textwrap.dedent(
    """
    from t5x_like.config import base_config
    from t5x_like.tasks import register_text_task

    def get_config(arg=None):
        register_text_task("bad_inputs_config_task", {path!r})
        c = base_config()
        c.data.task = "bad_inputs_config_task"
        return c
    """
)


def test_config_naming_an_unusable_source_fails_at_load(tmp_path):
    """A config that registers a text source of nothing but bad bytes fails as it loads."""
    (tmp_path / "junk.txt").write_bytes(b"\xff\xfe\xfd\n\n")
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG_WITH_TASK.format(path=str(tmp_path / "junk.txt")))
    with pytest.raises(UserError, match=r"contains no text \(skipped lines: 1 not valid UTF-8, "
                       r"1 blank \(empty documents\)\)"):
        config_lib.load_config(str(path))
