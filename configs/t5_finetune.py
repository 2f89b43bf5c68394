"""T5 text-to-text fine-tuning from a pretrained checkpoint, on any seqio task or mixture.

    t5x-like train --config configs/t5_finetune.py:tiny --workdir runs/t5_plays \
        --config.finetune.init_checkpoint=runs/demo            # the `make demo` checkpoint
    t5x-like train --config configs/t5_finetune.py:base --workdir runs/t5_glue \
        --config.finetune.init_checkpoint=runs/t5_base --config.data.task=glue_proportional
    ... --config.finetune.mode=lora|adapters|prompt|prefix|gradual|full

Presets match ``t5_span_corruption.py`` (tiny/small/base/large); the model fields must equal
the pretrained run's (a mismatch stops with the field to set). Default task: ``play_lines``
(which of five plays a speech comes from). Adafactor at a constant 1e-3 as T5's fine-tuning
(tiny: 3e-3, 300 steps), dropout 0.1; prompt tuning wants lr 0.3 as Lester et al. (set it
with the mode).
"""

from t5x_like import presets
from t5x_like.config import base_config

SIZES = {
    #        d_model d_kv heads d_ff  enc dec
    "tiny": (128, 32, 4, 512, 2, 2),
    "small": (512, 64, 6, 1024, 8, 8),
    "base": (768, 64, 12, 2048, 12, 12),
    "large": (1024, 64, 16, 2816, 24, 24),
}


def get_config(arg=None):
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("t5_finetune")
    d_model, d_kv, heads, d_ff, enc, dec = SIZES[preset]
    c.model.update(dict(d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff,
                        num_encoder_layers=enc, num_decoder_layers=dec, dropout_rate=0.1))
    c.data.task = "play_lines"
    c.finetune.targets_length = 8
    c.optimizer.update(dict(name="adafactor", schedule="constant", learning_rate=1e-3,
                            warmup_steps=0))
    if preset == "tiny":
        c.data.inputs_length = 64
        # Unrolled as the tiny pretraining preset; a tiny model takes a larger step (as there).
        presets.tiny_run(c, batch_size=32, learning_rate=3e-3, num_steps=300, eval_every=150,
                         checkpoint_every=150)
    else:
        c.data.inputs_length = 512
        presets.full_run(c, batch_size=128, num_steps=262_144)
    c.data.pack = True  # several examples per row, as T5X fine-tunes (finetune.packing)
    c.lock()
    return c
