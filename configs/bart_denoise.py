"""BART denoising pretraining: the paper's recipe (text infilling of 30% with Poisson(3) spans,
every sentence permuted), reconstructed by a post-LN encoder-decoder.

    t5x-like train --config configs/bart_denoise.py:tiny --workdir runs/bart_tiny
    t5x-like eval --checkpoint runs/bart_tiny
    t5x-like infer --checkpoint runs/bart_tiny --input "ROMEO: But soft, what <extra_id_0> through"

Other noise by config, composable (applied in fairseq's order: permute, mask, delete, infill,
rotate): ``--config.objective.mask_ratio=0.3``, ``delete_ratio``, ``infill_ratio`` (<= 0.5),
``poisson_lambda``, ``random_ratio`` (share of <mask>es replaced by random tokens),
``permute_sentences``, ``rotate_ratio``. <mask> is the vocabulary's top sentinel (type it as
<extra_id_0>). Sentence ends: ids whose text ends in ``objective.sentence_end_chars`` (".!?")
and EOS (families/bart.py).

Presets: ``tiny`` (CPU minutes), ``small`` (6+6 layers x 512), ``base`` (BART-base: 6+6 x 768,
12 heads, d_ff 3072, dropout 0.1, 512 tokens, AdamW b2 0.98 with linear decay).

``from=DIR`` continues a run, typically a Hugging Face BART brought in by ``import-hf``: the
config DIR holds (model, the checkpoint's own tokenizer as ``data.vocab_path``, optimizer), so
an imported ``facebook/bart``-layout checkpoint trains further with its own ids (pad 1, <s> 0,
</s> 2, decoder start 2, its <mask>; families/bart.py). Its data.task must tokenise with that
tokenizer (a task module: ``register_text_task(name, source,
vocabulary=get_vocabulary(DIR))``); choose the optimizer when importing, since the step-0
checkpoint holds its state::

    t5x-like import-hf hf/bart-base runs/bart --config.data.task_modules=my_tasks.py \\
        --config.data.task=my_corpus --config.optimizer.name=adamw
    t5x-like train --config configs/bart_denoise.py:from=runs/bart --workdir runs/bart \\
        --config.train.num_steps=1000 --config.optimizer.learning_rate=3e-5
"""

from pathlib import Path

from t5x_like import presets
from t5x_like.config import base_config, config_from_json
from t5x_like.errors import UserError

SIZES = {
    #        d_model heads d_ff enc dec inputs_length batch
    "tiny": (128, 4, 512, 2, 2, 128, 16),
    "small": (512, 8, 2048, 6, 6, 512, 64),
    "base": (768, 12, 3072, 6, 6, 512, 256),
}


def from_run(folder: str):
    """The config a BART run (or an ``import-hf`` output) wrote to ``folder``, to continue it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"bart_denoise.py:from={folder}: {path} is missing; pass a folder "
                        "written by t5x-like import-hf or train")
    c = config_from_json(path)
    if c.family != "bart":
        raise UserError(f"bart_denoise.py:from={folder}: the run there is family "
                        f"{c.family!r}, not 'bart'")
    c.lock()
    return c


def get_config(arg=None):
    if arg and arg.startswith("from="):
        return from_run(arg.removeprefix("from="))
    preset = presets.choose(SIZES, arg, default="small")
    c = base_config("bart")
    d_model, heads, d_ff, enc, dec, length, batch = SIZES[preset]
    c.model.update(dict(d_model=d_model, num_heads=heads, d_ff=d_ff, num_encoder_layers=enc,
                        num_decoder_layers=dec, max_position_embeddings=max(length, 1024)))
    c.data.inputs_length = length
    c.data.batch_size = batch
    presets.adamw(c, b2=0.98)
    if preset == "tiny":
        c.model.dropout_rate = 0.0
        presets.tiny_run(c, learning_rate=1e-3, warmup_steps=100)
    else:
        presets.full_run(c, learning_rate=4e-4, warmup_steps=10_000, num_steps=500_000)
    c.lock()
    return c
