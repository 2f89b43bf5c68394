"""Log-mel frames from waveforms with ``tf.signal`` (in the tf.data pipeline, on the host).

A frame is ``frame_length`` samples every ``frame_step`` (25 ms every 10 ms at 16 kHz), a
periodic Hann window, ``|rfft|^2`` over ``fft_length`` points, HTK-mel triangles
(``tf.signal.linear_to_mel_weight_matrix``: 1127 ln(1 + f / 700), triangles in mel space, no
DC bin) from ``lower_hz`` to ``upper_hz``, then ``log(mel + 1e-6)``, and per-utterance mean and
variance normalisation of each mel bin (CMVN), as Mockingjay's inputs are normalised.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

LOG_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class MelSettings:
    sample_rate: int = 16000
    frame_length: int = 400  # 25 ms
    frame_step: int = 160  # 10 ms
    fft_length: int = 512
    num_mel_bins: int = 80
    lower_hz: float = 20.0
    upper_hz: float = 8000.0
    normalize: bool = True  # per-utterance CMVN


def log_mel(waveform: tf.Tensor, s: MelSettings) -> tf.Tensor:
    """float32 [frames, num_mel_bins] of a 1-D waveform (int16 PCM or float in [-1, 1]); a
    clip shorter than one frame is zero-padded to one."""
    x = tf.cast(waveform, tf.float32)
    if waveform.dtype == tf.int16:
        x = x / 32768.0
    x = tf.pad(x, [[0, tf.maximum(0, s.frame_length - tf.shape(x)[0])]])
    spectrum = tf.signal.stft(x, frame_length=s.frame_length, frame_step=s.frame_step,
                              fft_length=s.fft_length, window_fn=tf.signal.hann_window,
                              pad_end=False)
    power = tf.math.square(tf.abs(spectrum))
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        num_mel_bins=s.num_mel_bins, num_spectrogram_bins=s.fft_length // 2 + 1,
        sample_rate=s.sample_rate, lower_edge_hertz=s.lower_hz, upper_edge_hertz=s.upper_hz)
    frames = tf.math.log(tf.matmul(power, mel_matrix) + LOG_FLOOR)
    if s.normalize:
        mean, variance = tf.nn.moments(frames, axes=[0], keepdims=True)
        frames = (frames - mean) / tf.sqrt(variance + 1e-5)
    return frames
