"""ELMo: a two-layer bidirectional LSTM LM on the default corpus, then its layers as features.

    t5x-like train --config configs/elmo.py:tiny --workdir runs/elmo_tiny
    t5x-like eval --checkpoint runs/elmo_tiny          # forward/backward perplexity
    t5x-like train --config configs/elmo.py:tiny --workdir runs/elmo_chars \
        --config.model.token_encoder=char_cnn          # the paper's character CNN
    t5x-like train --config configs/elmo.py:classify_tiny --workdir runs/elmo_plays \
        --config.finetune.init_checkpoint=runs/elmo_tiny   # frozen biLM, gamma * softmax mix

Presets: ``tiny`` (CPU minutes), ``small``, ``base`` (Peters et al. 2018: 4096 LSTM cells
projected to 512, char CNN with 2048 filters of widths 1-7, two highway layers, cell and
projection clipping at 3, dropout 0.1, residual connection between the layers, 20-token
unrolls). ``classify_<size>`` trains a classification head on the biLM's layers in
``finetune.mode='feature'`` with ``finetune.feature_weighted_sum`` (the task's softmax
weights and gamma) on ``play_lines``; the model fields must match the pretrained run.
Differences from the paper: a full softmax over our vocabulary (not sampled softmax over
793k words), AdamW (not Adagrad), and the default corpus, not the 1B Word Benchmark.
"""

from t5x_like import presets
from t5x_like.config import base_config
from t5x_like.tasks.play_lines import LABELS

SIZES = {
    #        proj lstm  encoder      length batch
    "tiny": (64, 256, "embedding", 64, 16),
    "small": (256, 1024, "char_cnn", 64, 64),
    "base": (512, 4096, "char_cnn", 20, 384),
}
PRESETS = {**{k: k for k in SIZES}, **{f"classify_{k}": k for k in SIZES}}


def get_config(arg=None):
    preset = presets.choose(PRESETS, arg, default="base")
    size = PRESETS[preset]
    classify = preset.startswith("classify_")
    c = base_config("elmo_finetune" if classify else "elmo")
    proj, lstm, encoder, length, batch = SIZES[size]
    c.model.update(dict(proj_dim=proj, lstm_dim=lstm, num_layers=2, token_encoder=encoder))
    if size == "tiny":  # a small char CNN for --config.model.token_encoder=char_cnn
        c.model.update(dict(char_filter_widths=(1, 2, 3, 4), char_filter_sizes=(16, 16, 32, 32),
                            max_chars=16, highway_layers=1, dropout_rate=0.0))
    elif size == "small":
        c.model.update(dict(char_filter_widths=(1, 2, 3, 4, 5),
                            char_filter_sizes=(32, 32, 64, 128, 256), max_chars=20))
    c.data.inputs_length = length
    presets.adamw(c)
    if classify:
        c.data.task = "play_lines"
        c.data.inputs_length = 64
        c.finetune.update(dict(mode="feature", feature_weighted_sum=True,
                               head="classification", label_names=LABELS))
        if size == "tiny":
            presets.tiny_run(c, batch_size=32, learning_rate=3e-3, warmup_steps=30,
                             num_steps=300, eval_every=100, checkpoint_every=100)
        else:
            presets.full_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=200,
                             num_steps=5000, eval_every=500, checkpoint_every=500)
    elif size == "tiny":
        presets.tiny_run(c, batch_size=batch, learning_rate=3e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=batch, learning_rate=1e-3, warmup_steps=2000,
                         num_steps=100_000)
    c.lock()
    return c
