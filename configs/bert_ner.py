"""Named-entity recognition (token classification) with a head on a pretrained BERT-style
encoder: CoNLL-2003 English from TFDS (task ``conll2003_ner``), one tag per word read at its
first piece, scored by span-level precision / recall / F1 (seqeval) in ``t5x-like eval``.

    t5x-like train --config configs/bert_ner.py:base --workdir runs/bert_conll \
        --config.finetune.init_checkpoint=runs/bert_base
    t5x-like eval --checkpoint runs/bert_conll     # token accuracy, span_precision/recall/f1
    ... --config.finetune.mode=feature|adapters|lora|full

The dataset must be prepared in the TFDS data dir first (``tfds build conll2003``; nothing is
downloaded at run time). Presets match ``bert_mlm_nsp.py`` (tiny/mini/small/medium/base/large);
Devlin et al.'s NER recipe: AdamW lr 5e-5 (tiny: 1e-3), warmup 10%, linear decay, batch 32,
a few epochs (here 3 over CoNLL's 14,041 training sentences: 1,300 steps), 128 pieces.
"""

from t5x_like import presets
from t5x_like.config import base_config
from t5x_like.tasks.ner import CONLL2003_TAGS

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
    c = base_config("bert_finetune")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    c.data.task = "conll2003_ner"
    c.data.inputs_length = 128
    c.finetune.head = "token_classification"
    c.finetune.pooling = "cls"  # unused by a per-token head; no pooler needed
    c.finetune.label_names = CONLL2003_TAGS
    presets.adamw(c)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=130,
                         num_steps=1300, eval_every=650, checkpoint_every=650)
    else:
        presets.full_run(c, batch_size=32, learning_rate=5e-5, warmup_steps=130,
                         num_steps=1300, eval_every=650, checkpoint_every=650)
    c.lock()
    return c
