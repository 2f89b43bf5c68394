"""StructBERT: BERT's masked LM + the word structural objective (after masking, K = 3
consecutive unmasked tokens are shuffled at 5% of the positions and each shuffled position
predicts its original token) + the sentence structural objective (``[CLS] S1 [SEP] S2 [SEP]``,
S2 the next segment, the previous one or one from another document, 1/3 each; a 3-way head on
the pooled [CLS]).

    t5x-like train --config configs/structbert.py:tiny --workdir runs/structbert_tiny
    t5x-like eval --checkpoint runs/structbert_tiny   # MLM, word_structure/, sentence_structure/

Presets: ``tiny`` (2 x 128, CPU minutes), ``small`` (4 x 512, 8 heads) and ``base`` / ``large``
(BERT's sizes, 512 tokens, 80 predictions). Optimizer and schedule are BERT's (AdamW lr 1e-4,
batch 256, warmup 10k, linear decay, weight decay 0.01, dropout 0.1); Wang et al. train with
Adam lr 1e-4 at batch 1024 for 40 epochs of their corpus. The word objective's settings:
``objective.word_shuffle_k`` (3) and ``objective.word_shuffle_rate`` (round(0.05 n) blocks per
row of n ordinary tokens).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length
    "tiny": (2, 128, 2, 128),
    "small": (4, 512, 8, 128),
    "base": (12, 768, 12, 512),
    "large": (24, 1024, 16, 512),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("structbert")
    layers, hidden, heads, length = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    c.data.inputs_length = length
    c.objective.max_predictions = 80 if length == 512 else 20
    presets.adamw(c)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                         num_steps=1_000_000)
    c.lock()
    return c
