"""ERNIE 1.0: BERT (masked LM + next sentence prediction) with knowledge masking: the masked
units are whole words, then phrases, then entities of a lexicon, each masked whole or not at
all, in three training stages (basic before 1/3 of the steps, phrase before 2/3, then entity).

    t5x-like train --config configs/ernie.py:tiny --workdir runs/ernie_tiny
    t5x-like eval --checkpoint runs/ernie_tiny        # MLM accuracy, nsp/accuracy
    ... --config.objective.lexicon=my_units.tsv      # lines 'entity<TAB>text' / 'phrase<TAB>text'
    ... --config.objective.phrase_stage_start=0.2 --config.objective.entity_stage_start=0.5

The default lexicon (``t5x_like/data/ernie_shakespeare.tsv``) is derived from the default corpus
by ``python -m t5x_like.data.lexicon``: the plays' multi-word character names as entities and
frequent high-PMI bigrams/trigrams as phrases (``data/lexicon.py`` says exactly how). Presets
match ``bert_mlm_nsp.py`` (``tiny`` 2/128/2 ... ``base`` 12/768/12 on 512 tokens, AdamW lr 1e-4,
warmup 10k, linear decay, dropout 0.1; ``tiny``: lr 1e-3, no dropout).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("ernie")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    long = preset in ("base", "large")
    c.data.inputs_length = 512 if long else 128
    c.objective.max_predictions = 80 if long else 20
    presets.adamw(c)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                         num_steps=1_000_000)
    c.lock()
    return c
