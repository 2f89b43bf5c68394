"""Extractive question answering (SQuAD v1.1): start/end logits over the encoder's tokens.

    t5x-like train --config configs/bert_squad.py:base --workdir runs/bert_squad \
        --config.finetune.init_checkpoint=runs/bert_base
    ... --config.finetune.mode=lora|adapters|prefix|...

Inputs are ``[CLS] question: q context: c [SEP]`` from the ``squad_v1`` task (TFDS); the gold
span is where the answer's tokens first occur in the inputs (examples whose answer is cut off
or tokenised differently in context are skipped). Loss (CE(start) + CE(end)) / 2 as BERT's;
prediction: the best start <= end within ``finetune.max_answer_length`` tokens. Devlin et
al.: AdamW lr 3e-5 (tiny: 1e-3), 2 epochs, 384 tokens.
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
    c = base_config("bert_finetune")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    c.data.task = "squad_v1"
    c.finetune.head = "span_qa"
    c.finetune.pooling = "cls"
    c.finetune.targets_length = 64
    c.finetune.max_answer_length = 30
    presets.adamw(c)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        c.data.inputs_length = 128
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        c.model.max_position_embeddings = 512
        c.data.inputs_length = 384
        presets.full_run(c, batch_size=32, learning_rate=3e-5, warmup_steps=554, num_steps=5540,
                         eval_every=1000, eval_batches=0, checkpoint_every=1000)
    c.data.pack = True  # several examples per row, as T5X fine-tunes (finetune.packing)
    c.lock()
    return c
