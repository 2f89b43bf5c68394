"""ALBERT: n-gram masked LM (n <= 3 whole words, p(n) ~ 1/n) + sentence-order prediction
(two consecutive segments, swapped with p = 0.5), factorised embeddings (E = 128) and one
transformer layer shared by every depth.

    t5x-like train --config configs/albert_sop.py:tiny --workdir runs/albert_tiny
    t5x-like eval --checkpoint runs/albert_tiny    # MLM accuracy, sop/accuracy

Presets: ``tiny`` (2 x 128, CPU minutes), ``small`` (6 x 512, 8 heads) and ``base`` (12 x 768,
12 heads, E 128, all layers shared: ~12M parameters with a 30k vocabulary; 512 tokens, 80
predictions, no dropout, GELU-tanh). Sharing by config: ``model.layer_sharing`` = all |
attention | ffn | groups (+ ``num_layer_groups``) | none. Optimizer: LAMB, as Lan et al. train
it (``optimizer.name='lamb'``, optax's): ``base`` is the paper's run (batch 4096, lr 0.00176,
warmup 3125, linear decay over 125k steps, weight decay 0.01, eps 1e-6); ``small`` keeps batch
256 with the lr scaled by sqrt(256 / 4096) (LAMB's square-root rule). ``tiny`` keeps AdamW
(lr 1e-3, warmup 100): LAMB moves each tensor by lr x its norm, so tens of CPU steps from a
0.02-std init barely move it (20 steps at lr 3e-3: no loss drop, measured); select it with
``--config.optimizer.name=lamb``. Unlike the reference's LAMB, optax's decays and
trust-ratio-scales every parameter, LayerNorm and biases included.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads length
    "tiny": (2, 128, 2, 128),
    "small": (6, 512, 8, 128),
    "base": (12, 768, 12, 512),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("albert")
    layers, hidden, heads, length = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden, embedding_size=128))
    c.data.inputs_length = length
    c.objective.max_predictions = 80 if length == 512 else 20
    # LAMB with AdamW's settings (b2 0.999, eps 1e-6, weight decay 0.01); tiny: AdamW itself.
    presets.adamw(c, name="adamw" if preset == "tiny" else "lamb")
    if preset == "tiny":
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    elif preset == "small":
        presets.full_run(c, batch_size=256, learning_rate=0.00176 * (256 / 4096) ** 0.5,
                         warmup_steps=3125, num_steps=125_000)
    else:
        presets.full_run(c, batch_size=4096, learning_rate=0.00176, warmup_steps=3125,
                         num_steps=125_000)
    c.lock()
    return c
