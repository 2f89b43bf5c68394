"""UniLM: one shared Transformer trained on four objectives at once, chosen per example by the
attention mask (1/3 bidirectional MLM, 1/3 seq2seq / prefix LM, 1/6 left-to-right, 1/6
right-to-left), each by predicting 15% masked tokens (80/10/10).

    t5x-like train --config configs/unilm.py:tiny --workdir runs/unilm_tiny
    t5x-like eval --checkpoint runs/unilm_tiny      # loss and accuracy in total and per mode

Mixture by config: ``--config.objective.bidirectional=0.5 --config.objective.seq2seq=0.5
--config.objective.left_to_right=0 --config.objective.right_to_left=0`` (must sum to 1).
Presets: ``tiny`` (CPU minutes), ``small`` (6 x 512) and ``base`` (BERT-base size: 12 x 768,
12 heads, 512 tokens, GELU, dropout 0.1, AdamW 1e-4 with warmup 10k and linear decay, wd 0.01).
The module is the decoder LM (pre-LN) with the mode's mask in place of the causal one.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model heads d_ff layers inputs_length batch
    "tiny": (128, 4, 512, 2, 128, 16),
    "small": (512, 8, 2048, 6, 512, 64),
    "base": (768, 12, 3072, 12, 512, 256),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("unilm")
    d_model, heads, d_ff, layers, length, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_kv=d_model // heads, d_ff=d_ff,
                        num_layers=layers, max_length=length))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c)
    if preset == "tiny":
        presets.tiny_run(c, learning_rate=1e-3, warmup_steps=100)
    else:
        c.model.dropout_rate = 0.1
        presets.full_run(c, learning_rate=1e-4, warmup_steps=10_000, num_steps=1_000_000)
    c.lock()
    return c
