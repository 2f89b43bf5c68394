"""ELECTRA: replaced-token detection. A small generator (MLM on 15% of the positions, 85%
[MASK] / 15% kept) fills the selected positions with samples from its softmax; the
discriminator labels every token original or replaced. Loss = MLM + 50 x BCE, trained jointly,
embeddings shared; the discriminator is the model to keep.

    t5x-like train --config configs/electra_rtd.py:tiny --workdir runs/electra_tiny
    t5x-like eval --checkpoint runs/electra_tiny   # generator MLM accuracy, disc/accuracy, disc/auc

Presets: ``tiny`` (2 x 128, CPU minutes), ``small`` (ELECTRA-Small: 12 layers, hidden 256,
4 heads, FFN 1024, E 128, generator 1/4 wide; 128 tokens, batch 128, lr 5e-4) and ``base``
(12 x 768, 12 heads, generator 1/4; 512 tokens, batch 256, lr 2e-4). AdamW, warmup 10k, linear
decay, weight decay 0.01, eps 1e-6, dropout 0.1 (``tiny``: none).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads embedding length batch lr
    "tiny": (2, 128, 2, 128, 128, 32, 1e-3),
    "small": (12, 256, 4, 128, 128, 128, 5e-4),
    "base": (12, 768, 12, 0, 512, 256, 2e-4),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("electra")
    layers, hidden, heads, embedding, length, batch, lr = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden, embedding_size=embedding,
                        generator_fraction=0.25))
    c.data.inputs_length = length
    c.data.batch_size = batch
    c.objective.max_predictions = 80 if length == 512 else 20
    presets.adamw(c, learning_rate=lr)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, warmup_steps=100)
    else:
        presets.full_run(c, warmup_steps=10_000, num_steps=1_000_000)
    c.lock()
    return c
