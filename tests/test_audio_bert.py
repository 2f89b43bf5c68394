"""Audio BERT (configs/audio_bert.py): log-mel frames from tf.signal against transformers'
audio_utils (an independent STFT and HTK mel filter bank), the span masking's realised
statistics, the L1 loss against NumPy, and training on TFDS speech_commands through
``tfds.testing.mock_data`` (no download): ``t5x-like train`` and ``eval`` in-process, a
bit-exact resume, and 8 fake devices.
"""

from __future__ import annotations

import json
import os
import textwrap

import family_runs
import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

from t5x_like.data.audio_features import MelSettings, log_mel
from t5x_like.objectives.acoustic import AcousticMasking, l1_sums, mask_frames

MOCK = textwrap.dedent(
    '''
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def synthetic_clip(i):
        """Two tones and a chirp in noise, 0.5-1 s at 16 kHz, int16: a learnable spectrum."""
        rng = np.random.default_rng(i)
        n = int(rng.integers(8000, 16001))
        t = np.arange(n) / 16000.0
        f1, f2 = 200 + 40 * (i % 9), 900 + 70 * (i % 7)
        x = (0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t)
             + 0.1 * np.sin(2 * np.pi * (300 + 2000 * t) * t) + 0.02 * rng.normal(size=n))
        return (x * 32767 * 0.8).astype(np.int16)

    def as_dataset(self, split, *args, **kwargs):
        count = 48 if str(split).startswith("train") else 16
        offset = 0 if str(split).startswith("train") else 1000
        return tf.data.Dataset.from_generator(
            lambda: ({"audio": synthetic_clip(offset + i), "label": i % 12}
                     for i in range(count)),
            output_signature={"audio": tf.TensorSpec([None], tf.int16),
                              "label": tf.TensorSpec([], tf.int64)})

    def mocked():
        return tfds.testing.mock_data(as_dataset_fn=as_dataset)
    ''')
namespace: dict = {}
exec(MOCK, namespace)  # the same mock in this process and in the 8-device subprocess
mocked, synthetic_clip = namespace["mocked"], namespace["synthetic_clip"]

RUN = ["model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
       "model.num_layers=1", "data.inputs_length=16", "data.batch_size=8", "train.num_steps=20",
       "train.log_every=1", "train.eval_every=20", "train.eval_batches=1",
       "train.checkpoint_every=10", "train.progress_bar=False", "optimizer.warmup_steps=5",
       "optimizer.learning_rate=0.005"]


def test_log_mel_equals_transformers_audio_utils():
    """tf.signal's frames, Hann window, power spectrum and HTK mel matrix against
    transformers.audio_utils.spectrogram with its own mel_filter_bank (triangles in mel
    space, as TensorFlow builds them); CMVN gives zero-mean, unit-variance bins."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    s = MelSettings(normalize=False)
    wave = synthetic_clip(3)
    ours = log_mel(tf.constant(wave), s).numpy()
    filters = mel_filter_bank(num_frequency_bins=s.fft_length // 2 + 1,
                              num_mel_filters=s.num_mel_bins, min_frequency=s.lower_hz,
                              max_frequency=s.upper_hz, sampling_rate=s.sample_rate,
                              norm=None, mel_scale="htk", triangularize_in_mel_space=True)
    theirs = spectrogram(wave.astype(np.float64) / 32768.0,
                         window_function(s.frame_length, "hann", periodic=True),
                         frame_length=s.frame_length, hop_length=s.frame_step,
                         fft_length=s.fft_length, power=2.0, center=False,
                         mel_filters=filters, mel_floor=0.0).T
    theirs = np.log(theirs + 1e-6)
    assert ours.shape == theirs.shape == (1 + (len(wave) - 400) // 160, 80)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    assert np.abs(ours - theirs).mean() < 2e-4
    normalised = log_mel(tf.constant(wave), MelSettings()).numpy()
    np.testing.assert_allclose(normalised.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalised.std(0), 1.0, atol=1e-2)
    assert log_mel(tf.constant(wave[:100]), s).shape == (1, 80)  # shorter than a frame


def runs_of(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
                    - np.flatnonzero(edges == 1), strict=True))


def test_span_masking_realises_mockingjays_statistics():
    """15% of positions in runs of at least 7 (merged spans), never padding; per span 80%
    zeros, 10% frames from elsewhere in the utterance, 10% unchanged."""
    m = AcousticMasking()
    b, t, d = 256, 200, 4
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(b, t, d)).astype(np.float32) + 5.0  # never exactly zero
    valid = np.ones((b, t), bool)
    valid[: b // 2, 150:] = False
    out = jax.device_get(mask_frames(frames, valid, jax.random.key(0), m))
    sel, starts, inputs = out["selected"], out["starts"], out["inputs"]
    assert not (sel & ~valid).any()
    inner = sel[b // 2:, m.span:t - m.span]  # away from the edges: exactly 1-(1-p)^7
    assert abs(inner.mean() - 0.15) < 0.01
    for row, ok in zip(sel, valid, strict=True):
        end = int(ok.sum())
        for start, length in runs_of(row):
            assert length >= m.span or start + length == end
    kinds = {"zero": 0, "random": 0, "same": 0}
    for i, j in zip(*np.nonzero(starts), strict=True):
        span = slice(j, min(j + m.span, int(valid[i].sum())))
        if starts[i, j + 1:j + m.span].any():
            continue  # a later start overrides the tail: judge isolated spans only
        if (inputs[i, span] == 0).all():
            kinds["zero"] += 1
        elif np.array_equal(inputs[i, span], frames[i, span]):
            kinds["same"] += 1
        else:
            kinds["random"] += 1
            rows = {tuple(r) for r in frames[i, : int(valid[i].sum())]}
            assert all(tuple(r) in rows for r in inputs[i, span])  # from the same utterance
    total = sum(kinds.values())
    assert total > 800
    assert abs(kinds["zero"] / total - 0.8) < 0.04
    assert abs(kinds["random"] / total - 0.1) < 0.03 and abs(kinds["same"] / total - 0.1) < 0.03
    unselected = valid & ~sel
    np.testing.assert_array_equal(inputs[unselected], frames[unselected])


def test_l1_is_the_mean_absolute_error_of_selected_values():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 3))
    sel = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], bool)
    valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    sums = l1_sums(pred, target, sel, valid)
    np.testing.assert_allclose(float(sums["loss"] / sums["weight"]),
                               np.abs(pred - target)[sel].mean(), rtol=1e-6)
    assert float(sums["mask/selected"] / sums["mask/weight"]) == pytest.approx(3 / 9)


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """configs/audio_bert.py:tiny on mocked speech_commands through ``t5x-like train`` (20
    steps, a restart after step 10) and ``eval --json``, each in its own process: the mock is
    a task module (``data.task_modules``) that enters ``tfds.testing.mock_data`` on import."""
    from conftest import run_cli

    cache = family_runs.compilation_cache_env(tmp_path_factory)
    base = tmp_path_factory.mktemp("audio")
    env = {**next(cache), "TFDS_DATA_DIR": str(base / "tfds")}
    module = base / "mock_speech_commands.py"
    module.write_text(MOCK + textwrap.dedent("""
        import atexit, contextlib, os
        from tensorflow_datasets.testing import test_utils

        class RealDataDir:
            # mock_data fakes the dataset folder with a mock file system that redirects every
            # write of the process while TFDS reads (orbax's async checkpoint writer's too);
            # the folder is made for real instead, under $TFDS_DATA_DIR (a test folder).
            def add_file(self, path, content=""):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()

        test_utils.MockFs = lambda: contextlib.nullcontext(RealDataDir())
        _MOCK = mocked()
        _MOCK.__enter__()  # for the life of the process; atexit holds the reference
        atexit.register(_MOCK.__exit__, None, None, None)
        """))
    straight, resumed = base / "straight", base / "resumed"
    args = [f"--config.{o}" for o in RUN] + [f"--config.data.task_modules={module}"]
    for workdir in (straight, resumed):
        if workdir == resumed:
            family_runs.restart_from_step_10(straight, resumed)
        result = run_cli("train", "--config", "configs/audio_bert.py:tiny", "--workdir",
                         str(workdir), *args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stdout
    report = base / "eval.json"
    result = run_cli("eval", "--checkpoint", str(straight), "--batches", "2", "--no-baseline",
                     "--json", str(report), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    yield straight, resumed, json.loads(report.read_text())
    next(cache, None)


def test_audio_bert_trains_resumes_bit_exact_and_evaluates(audio_run):
    straight, resumed, report = audio_run
    family_runs.check_run(straight, resumed, min_drop=0.02)  # measured 0.028 at lr 0.003
    assert report["step"] == 20 and report["task"] == "speech_commands"
    assert 0.0 < report["l1"] < 2.0 and report["l1"] == pytest.approx(report["loss"])
    assert 0.05 < report["mask/selected"] < 0.3


def test_bad_audio_settings_are_one_sentence():
    from t5x_like import config as config_lib
    from t5x_like.errors import UserError

    os.chdir(ROOT)
    with pytest.raises(UserError, match="mask_ratio"):
        config_lib.load_config("configs/audio_bert.py:tiny", ["objective.mask_ratio=1.5"])
    with pytest.raises(UserError, match="speech task"):
        config_lib.load_config("configs/audio_bert.py:tiny", ["data.task=shakespeare"])
    with pytest.raises(UserError, match="zero_prob"):
        config_lib.load_config("configs/audio_bert.py:tiny", ["objective.random_prob=0.5"])


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from t5x_like import config as config_lib
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    out, batch, initial = {}, None, None
    with mocked():
        for name, (rules, fsdp, tensor) in [("one", ("dp", 1, 1)), ("fsdp8", ("fsdp", 8, 1)),
                                            ("tensor8", ("tensor", 1, 8))]:
            config = config_lib.load_config("configs/audio_bert.py:tiny", OVERRIDES + [
                f"mesh.rules={rules}", "mesh.data=1", f"mesh.fsdp={fsdp}",
                f"mesh.tensor={tensor}"])
            exp = build(config, jax.devices()[: fsdp * tensor])
            if batch is None:
                batch = next(exp.family.batches(split="train", batch_size=8, shuffle=False,
                                                repeat=True, skip_batches=0, shard_index=0,
                                                num_shards=1))
                initial = jax.device_get(exp.init_state())
            state = jax.device_put(initial, exp.state_shardings)
            step = make_train_step(exp)
            losses = []
            for _ in range(2):
                state, metrics = step(state, jax.device_put(batch, exp.batch_sharding))
                losses.append(float(metrics["loss"]))
            out[name] = losses
    print("RESULT" + json.dumps(out))
    """)


@pytest.mark.slow
def test_eight_fake_devices_fsdp_and_tensor_equal_one_device():
    overrides = [*RUN, "optimizer.warmup_steps=0"]  # the second step moves
    out = family_runs.on_8_devices(MOCK + f"\nOVERRIDES = {overrides!r}\n" + SCRIPT, ROOT)
    for name in ("fsdp8", "tensor8"):
        np.testing.assert_allclose(out[name], out["one"], rtol=2e-5)
    assert out["one"][1] < out["one"][0]
