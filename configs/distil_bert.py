"""DistilBERT: a student half as deep as its BERT teacher, initialised from every other teacher
layer and pretrained with masked LM on the teacher's soft targets (T = 2, scaled by T^2,
weight 5), the hard labels (weight 2) and the cosine of the last hidden states (weight 1).

    t5x-like train --config configs/bert_mlm_nsp.py:tiny --workdir runs/bert_tiny \\
        --config.objective.layout=full_sentences --config.model.nsp_head=False \\
        --config.model.pooler=False
    t5x-like train --config configs/distil_bert.py:tiny --workdir runs/distil_tiny \\
        --config.objective.teacher=runs/bert_tiny
    t5x-like compress-report --checkpoint runs/bert_tiny --variant runs/distil_tiny --int8

TinyBERT's terms by config: ``--config.objective.alpha_hidden_mse=1`` (layer-mapped hidden
states, through a learned projection when the widths differ) and
``--config.objective.alpha_attention=1`` (attention maps). Q8BERT quantization-aware training:
``--config.model.quantize=fake``; pruning: ``--config.objective.prune=magnitude`` (or
``movement``) ``--config.objective.prune_sparsity=0.5 --config.objective.prune_end=800``.
No teacher (``--config.objective.teacher=''`` and the teacher weights 0) trains the same
student on plain MLM. Presets are the BERT presets' widths with half their layers: ``tiny``
(1 layer, 128), ``mini`` (2, 256), ``small`` (2, 512), ``medium`` (4, 512), ``base`` (6, 768:
DistilBERT) and ``large`` (12, 1024); the teacher must be the matching bert_mlm_nsp preset.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #          layers hidden heads (the teacher's depth is twice the layers)
    "tiny": (1, 128, 2),
    "mini": (2, 256, 4),
    "small": (2, 512, 8),
    "medium": (4, 512, 8),
    "base": (6, 768, 12),
    "large": (12, 1024, 16),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="base")
    c = base_config("distill")
    layers, hidden, heads = SIZES[preset]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
                        intermediate_size=4 * hidden))
    long = preset in ("base", "large")
    c.data.inputs_length = 512 if long else 128
    c.objective.max_predictions = 80 if long else 20
    c.objective.teacher = f"runs/bert_{preset}"
    # DistilBERT: Adam 5e-4, warmup, no weight decay, gradient clipping 5.
    presets.adamw(c, b2=0.98, weight_decay=0.0, grad_clip_norm=5.0)
    if preset == "tiny":
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, batch_size=256, learning_rate=5e-4, warmup_steps=10_000,
                         num_steps=1_000_000)
    c.lock()
    return c
