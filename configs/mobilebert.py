"""MobileBERT: a thin, deep BERT (bottlenecked blocks, stacked FFNs, NoNorm, ReLU, trigram
embeddings) pretrained with MLM + NSP, and its progressive knowledge transfer (PKT) from an
inverted-bottleneck teacher (IB-BERT: the same inter-block width, a wide intra-block body).

    t5x-like train --config configs/mobilebert.py:tiny --workdir runs/mobilebert_tiny
    t5x-like eval --checkpoint runs/mobilebert_tiny          # MLM accuracy, nsp/accuracy

Progressive knowledge transfer, one run per student layer, then pretraining from the result:

    t5x-like train --config configs/mobilebert.py:tiny_teacher --workdir runs/ib_tiny
    t5x-like train --config configs/mobilebert.py:tiny_pkt --workdir runs/pkt1 \\
        --config.objective.teacher=runs/ib_tiny --config.objective.pkt_layer=1
    t5x-like train --config configs/mobilebert.py:tiny_pkt --workdir runs/pkt2 \\
        --config.objective.teacher=runs/ib_tiny --config.objective.pkt_layer=2 \\
        --config.objective.init_student=runs/pkt1
    t5x-like train --config configs/mobilebert.py:tiny_pd --workdir runs/mobilebert_tiny_pd \\
        --config.objective.teacher=runs/ib_tiny --config.objective.init_student=runs/pkt2
    t5x-like eval --checkpoint runs/mobilebert_tiny_pd      # MLM and NSP accuracy, pd/kl

The last run is the paper's pre-training distillation: the whole student trains on
0.5 MLM + 0.5 KL(teacher || student MLM distributions) + NSP (``objective.pd_alpha``, the
authors' 0.5); ``:tiny`` instead continues plain MLM + NSP pretraining from the PKT student.

Presets (layers / inter-block H / intra-block B / heads / FFN width x stacked FFNs / E):
``tiny`` 2/64/32/2/64x2/16, ``small`` 4/128/32/4/128x4/32 and ``base`` 24/512/128/4/512x4/128
(MobileBERT as published); ``*_teacher`` are their IB-BERT teachers (B = 128, 256, 1024, one
FFN of 4B, GELU, LayerNorm), ``*_pkt`` a PKT stage of the student, ``*_pd`` its pre-training
distillation. Teachers and students share H, depth, heads and E, as PKT needs. ``tiny`` trains
on 128 tokens with AdamW (lr 1e-3); ``small``/``base`` with LAMB (optax's; batch 4096 for
``base``, as the paper) on 128 tokens.
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        layers  H    B   heads ffn n_ffn  E
    "tiny": (2, 64, 32, 2, 64, 2, 16),
    "small": (4, 128, 32, 4, 128, 4, 32),
    "base": (24, 512, 128, 4, 512, 4, 128),
}
TEACHER_B = {"tiny": 128, "small": 256, "base": 1024}
PRESETS = {f"{size}{kind}": None for size in SIZES for kind in ("", "_teacher", "_pkt", "_pd")}


def get_config(arg=None):
    preset = presets.choose(PRESETS, arg, default="base")
    size, _, kind = preset.partition("_")
    c = base_config({"pkt": "mobilebert_pkt", "pd": "mobilebert_pd"}.get(kind, "mobilebert"))
    layers, hidden, bottleneck, heads, ffn, n_ffn, embedding = SIZES[size]
    c.model.update(dict(num_layers=layers, hidden_size=hidden, intra_bottleneck_size=bottleneck,
                        num_heads=heads, intermediate_size=ffn, num_feedforward_networks=n_ffn,
                        embedding_size=embedding))
    if kind == "teacher":  # IB-BERT: a wide body inside the same inter-block width
        b = TEACHER_B[size]
        c.model.update(dict(intra_bottleneck_size=b, intermediate_size=4 * b,
                            num_feedforward_networks=1, hidden_act="gelu",
                            normalization_type="layer_norm"))
    c.data.inputs_length = 128
    c.objective.max_predictions = 20
    if kind in ("pkt", "pd"):
        c.objective.teacher = f"runs/ib_{size}"
    if size == "tiny":
        presets.adamw(c)
        c.model.update(dict(hidden_dropout_rate=0.0, attention_dropout_rate=0.0))
        presets.tiny_run(c, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.adamw(c, name="lamb")
        batch = 4096 if size == "base" else 256
        presets.full_run(c, batch_size=batch, learning_rate=0.0015 * (batch / 4096) ** 0.5,
                         warmup_steps=10_000, num_steps=500_000)
    c.lock()
    return c
