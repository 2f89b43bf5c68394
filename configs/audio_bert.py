"""Audio BERT: Mockingjay's masked acoustic modelling on log-mel frames of speech_commands.

    tfds build speech_commands                       # once: the TFDS data (about 2.4 GB)
    t5x-like train --config configs/audio_bert.py:tiny --workdir runs/audio_tiny
    t5x-like eval --checkpoint runs/audio_tiny --no-baseline   # L1 on masked frames

Presets: ``tiny`` (CPU minutes), ``small`` (3 layers x 256) and ``base`` (Liu et al. 2020's
Mockingjay base: 3 layers x 768, 12 heads, FFN 3072, frames stacked by 3, 15% of positions
masked in spans of 7 consecutive positions, 80/10/10 zero/random/unchanged, L1 loss, AdamW at
4e-4 ... 2e-4 with warmup 7%, dropout 0.1). Inputs: 80 log-mel bins of 25 ms Hann frames
every 10 ms (tf.signal), per-utterance CMVN. ``data.inputs_length`` counts positions (x3
frames). Differences from the paper: 1-second speech_commands clips instead of LibriSpeech
utterances, 80 mel bins without deltas (Mockingjay: 160-dimensional fbank + delta features),
and masking per span (not a second "no mask" draw per utterance).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        hidden heads ffn layers positions batch
    "tiny": (64, 4, 256, 2, 32, 16),
    "small": (256, 4, 1024, 3, 34, 32),
    "base": (768, 12, 3072, 3, 34, 32),  # 34 x 3 frames: a whole 1-second clip
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("audio_bert")
    hidden, heads, ffn, layers, positions, batch = SIZES[preset]
    c.model.update(dict(hidden_size=hidden, num_heads=heads, intermediate_size=ffn,
                        num_layers=layers))
    c.data.task = "speech_commands"
    c.data.inputs_length = positions
    presets.adamw(c)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=batch, learning_rate=1e-3, warmup_steps=50)
    else:
        presets.full_run(c, batch_size=batch, learning_rate=2e-4, warmup_steps=35_000,
                         num_steps=500_000)
    c.lock()
    return c
