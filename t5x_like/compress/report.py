"""``t5x-like compress-report``: what each compressed variant of a checkpoint costs and saves.

Rows: the checkpoint's encoder, each ``--variant`` workdir (a distilled, quantization-aware or
pruned run), optionally each row's int8 export (``--int8``; a float model's activation ranges
are first calibrated as Q8BERT's EMA over the evaluation batches) and the checkpoint with its
least important heads removed (``--prune-heads K``, importance from ``prune.head_importance``).
Columns: parameters, bytes on disk (the ``artifacts`` folder: weights + config, no optimizer
state), CPU latency per evaluation batch (median of jitted forward passes) and MLM accuracy on
the same masked validation batches for every row (the checkpoint's masking, fixed keys).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5x_like.compress import artifacts
from t5x_like.compress import prune as P
from t5x_like.compress import quantize as Q
from t5x_like.errors import UserError
from t5x_like.models.encoder import EncoderConfig, EncoderModel


@dataclasses.dataclass
class Row:
    name: str
    params: int
    bytes: int
    latency_ms: float
    accuracy: float
    note: str = ""


def encoder_of(workdir: str | Path):
    """(experiment, encoder config, encoder params) of any encoder workdir."""
    from t5x_like.evaluation.driver import load_checkpoint
    from t5x_like.families.distill import DistillFamily

    exp, params, _ = load_checkpoint(workdir)
    params = jax.device_get(params)
    if isinstance(exp.family, DistillFamily):
        return exp, exp.family.model_config, params["student"]
    if not isinstance(exp.family.model_config, EncoderConfig):
        raise UserError(f"{workdir} holds a {exp.config.family} model; compress-report "
                        "measures encoders (bert, roberta, albert, spanbert, distill runs)")
    return exp, exp.family.model_config, params


def eval_batches(exp, num_batches: int) -> list[dict]:
    """Masked validation batches (the family's features under fixed keys), on the host."""
    from t5x_like.evaluation import loop as eval_loop

    key = jax.random.fold_in(exp.root_key, eval_loop.EVAL_KEY_SALT)
    features = jax.jit(exp.family.features)
    out = []
    stream = eval_loop.device_batches(exp, split=exp.config.data.eval_split, repeat=False,
                                      shuffle=False)
    for i, batch in enumerate(stream):
        if i >= num_batches:
            break
        out.append(jax.device_get(features(batch, jax.random.fold_in(key, i))))
    if not out:
        raise UserError("the validation split gave no batch to measure on")
    return out


def _forward(model: EncoderModel, batch: dict, head_mask=None) -> dict:
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                 masked_positions=batch["positions"], head_mask=head_mask)


def _runner(config: EncoderConfig, params: dict):
    """A jitted CPU forward pass -> MLM logits, and its params already on the CPU."""
    cpu = jax.devices("cpu")[0]
    graphdef, state = nnx.split(artifacts.merge(config, params), nnx.Param)
    run = jax.jit(lambda s, b: _forward(nnx.merge(graphdef, s), b)["mlm_logits"])
    return run, jax.device_put(state, cpu), cpu


def measure(config: EncoderConfig, params: dict, batches: list[dict],
            repeats: int) -> tuple[float, float]:
    """(median ms per forward pass of ``batches[0]``, MLM accuracy over ``batches``), both
    from one compilation on the CPU."""
    run, state, cpu = _runner(config, params)
    batches = jax.device_put(batches, cpu)
    run(state, batches[0]).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(state, batches[0]).block_until_ready()
        times.append(time.perf_counter() - start)
    hits = total = 0.0
    for b in batches:
        logits = np.asarray(run(state, b))
        w = np.asarray(b["target_weights"])
        hits += float(((logits.argmax(-1) == np.asarray(b["targets"])) * w).sum())
        total += float(w.sum())
    return 1000.0 * float(np.median(times)), hits / max(total, 1.0)


def calibrate(config: EncoderConfig, params: dict, batches: list[dict]) -> tuple:
    """A float encoder's fake-quantized twin with Q8BERT EMA ranges over ``batches``."""
    fake = dataclasses.replace(config, quantize="fake")
    model = nnx.eval_shape(lambda: EncoderModel(fake, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    ranges = nnx.to_pure_dict(state)
    merged = _overlay(ranges, params)
    observe = jax.jit(lambda p, b: _forward(nnx.merge(graphdef, p), b)["activation_absmax"])
    for b in batches:
        merged = Q.update_ranges(merged, observe(merged, b), decay=0.9)
    return fake, jax.device_get(merged)


def _overlay(template: dict, values: dict) -> dict:
    """``template``'s tree with every leaf ``values`` has taken from it (ranges start at 0)."""
    return {k: (_overlay(v, values.get(k, {})) if isinstance(v, dict)
                else jnp.asarray(values[k]) if k in values
                else jnp.zeros(v.shape, v.dtype)) for k, v in template.items()}


def build_report(checkpoint: str, variants: list[str], *, int8: bool, prune_heads: int,
                 num_batches: int, repeats: int, out_dir: str | None = None) -> list[Row]:
    """Measures every row (see the module docstring)."""
    exp, config, params = encoder_of(checkpoint)
    batches = eval_batches(exp, num_batches)
    vocab = exp.config.model.vocab_size
    models = [(Path(checkpoint).name or "checkpoint", config, params, "")]
    for v in variants:
        v_exp, v_config, v_params = encoder_of(v)
        if v_exp.config.model.vocab_size != vocab or \
                v_exp.config.data.vocab_path != exp.config.data.vocab_path:
            raise UserError(f"{v} uses another vocabulary than {checkpoint}; rows must be "
                            "scored on the same tokens")
        models.append((Path(v).name, v_config, v_params, ""))
    if prune_heads:
        models.append(_head_pruned(config, params, batches, prune_heads))
    if int8:
        for name, c, p, _ in list(models):
            if c.quantize == "fake":
                fake, fake_params, note = c, p, "QAT ranges"
            else:
                fake, fake_params = calibrate(c, p, batches)
                note = "post-training ranges"
            models.append((f"{name} int8", Q.int8_config(fake), Q.to_int8(fake_params), note))
    base = Path(out_dir or tempfile.mkdtemp(prefix="compress-report-"))
    rows = []
    for i, (name, c, p, note) in enumerate(models):
        folder = artifacts.save(base / f"{i}", c, p, {"name": name})
        count = sum(int(np.size(x)) for x in jax.tree.leaves(p))
        if c.quantize != "none":
            note = note or "fake-quantized"
        latency, accuracy = measure(c, p, batches, repeats)
        rows.append(Row(name, count, artifacts.folder_bytes(folder), latency, accuracy, note))
    return rows


def _head_pruned(config: EncoderConfig, params: dict, batches: list[dict], k: int) -> tuple:
    if config.scan_layers:
        raise UserError("--prune-heads needs a checkpoint trained with model.scan_layers=False")

    def loss(mask, b):
        logits = _forward(artifacts.merge(config, params), b, head_mask=mask)["mlm_logits"]
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * b["target_weights"]) / jnp.maximum(b["target_weights"].sum(), 1)

    importance = P.head_importance(loss, config.num_layers, config.num_heads, batches)
    if not 0 < k < importance.size:
        raise UserError(f"--prune-heads {k} must be between 1 and {importance.size - 1}")
    pruned, pruned_config = P.remove_heads(params, config, P.heads_to_keep(importance, k))
    return (f"-{k} heads", pruned_config, pruned, "Michel et al. importance")


def format_rows(rows: list[Row]) -> str:
    base = rows[0]
    lines = [f"{'model':<28} {'params':>10} {'MiB on disk':>12} {'ms/batch':>9} "
             f"{'MLM acc':>8}  note"]
    for r in rows:
        lines.append(f"{r.name:<28} {r.params:>10,} {r.bytes / 2**20:>12.2f} "
                     f"{r.latency_ms:>9.2f} {r.accuracy:>8.4f}  {r.note}"
                     + ("" if r is base else f" (x{base.bytes / max(r.bytes, 1):.1f} smaller)"))
    return "\n".join(lines)
