"""Compressing an encoder while pretraining it: MLM distillation from a frozen teacher checkpoint
(DistilBERT, TinyBERT), Q8BERT quantization-aware training and magnitude/movement pruning.

The student is the BERT family's encoder (``config.model``), fed by the BERT family's data and
masking (``objective.layout``, 15% 80/10/10; default ``full_sentences`` without NSP, as
DistilBERT). ``objective.teacher`` names a workdir of any encoder run (bert, roberta, albert,
spanbert, or this family: its student); teacher and student read the same masked batch. Loss
(``compress/distill.py``) = ``alpha_ce`` T^2 soft-target CE + ``alpha_mlm`` MLM CE +
``alpha_cos`` (1 - cos) of the last hidden states + ``alpha_hidden_mse`` layer-mapped hidden
MSE (through a learned projection when widths differ) + ``alpha_attention`` attention-map MSE.
Without a teacher (``teacher=''``) it is the plain MLM student, the baseline distillation must
beat. ``init_from_teacher`` copies every other teacher layer into the student (DistilBERT).

Parameters: ``{'student', 'teacher', 'projection', 'scores'}``. The teacher lives in the train
state (so it is sharded, checkpointed and passed to the jitted step as an argument, never baked
into it as a constant); it gets no gradient and ``after_update`` copies it forward unchanged,
so weight decay cannot touch it (its optimizer moments stay zero; Adam still allocates them).

``after_update`` (called by the train step after each applied update) also moves Q8BERT's
activation ranges (``model.quantize='fake'``) by their EMA (``objective.quant_ema_decay``)
using one extra forward pass on the batch, and prunes (``objective.prune``): the sparsity
follows the cubic schedule to ``prune_sparsity`` between ``prune_begin`` and ``prune_end``;
pruned weights are zeroed, so the checkpoint's zeros are the masks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import losses
from t5x_like.compress import distill as D
from t5x_like.compress import prune as P
from t5x_like.compress import quantize as Q
from t5x_like.errors import UserError, check
from t5x_like.families.bert import EncoderFamily
from t5x_like.models.encoder import Dense, EncoderConfig, EncoderModel

_RANGES = ("input_range", "decoder_range")



class DistillModel(nnx.Module):
    """Student encoder, optional frozen teacher, projection (student -> teacher width) and
    movement scores (one per prunable student matrix)."""

    def __init__(self, student: EncoderConfig, *, rngs: nnx.Rngs,
                 teacher: EncoderConfig | None = None, projection: bool = False,
                 movement: bool = False):
        self.student = EncoderModel(student, rngs=rngs)
        if teacher is not None:
            self.teacher = EncoderModel(teacher, rngs=rngs)
        if projection:
            plain = dataclasses.replace(student, quantize="none")
            self.projection = Dense((student.hidden_size,), (teacher.hidden_size,), ("embed",),
                                    ("mlp",), plain, rngs=rngs)
        if movement:
            flat = nnx.to_flat_state(nnx.state(self.student, nnx.Param))
            kernels = dict(flat)
            params = nnx.to_pure_dict(nnx.state(self.student, nnx.Param))
            self.scores = nnx.Dict({
                P.score_key(path): nnx.Param(jnp.zeros(kernels[path].shape, jnp.float32),
                                             **_names(kernels[path]))
                for path in P.prunable_paths(params)})


def _names(var) -> dict:
    sharding = var.get_metadata().get("out_sharding")
    return {"out_sharding": sharding} if sharding else {}


def load_teacher(workdir: str) -> tuple[EncoderConfig, dict]:
    """(config, params) of the encoder a workdir trained (a distill run's: its student)."""
    from t5x_like.evaluation.driver import load_checkpoint

    if not (Path(workdir) / "config.json").is_file():
        raise UserError(f"objective.teacher={workdir!r} is not a t5x-like workdir (no "
                        "config.json); train or import-hf a teacher there first")
    exp, params, _ = load_checkpoint(workdir)
    params = jax.device_get(params)
    family = exp.family
    if isinstance(family, DistillFamily):
        return family.model_config, params["student"]
    if not isinstance(family.model_config, EncoderConfig) or family.module_class is not \
            EncoderModel:
        raise UserError(f"the teacher in {workdir} is a {exp.config.family} model; a teacher "
                        "must be an encoder with an MLM head (bert, roberta, albert, spanbert)")
    if not family.model_config.mlm_head:
        raise UserError(f"the teacher in {workdir} has no MLM head to distil from")
    return family.model_config, params


class DistillFamily(EncoderFamily):
    """MLM pretraining of a (distilled, quantized, pruned) student encoder."""

    objective_name = "distill_mlm"

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)  # the student's masking, data and module config
        o = config.objective
        self.weights = D.DistillWeights(o.temperature, o.alpha_ce, o.alpha_mlm, o.alpha_cos,
                                        o.alpha_hidden_mse, o.alpha_attention)
        self.teacher_config, self.teacher_params = None, None
        student = self.model_config
        if o.teacher:
            self.teacher_config, self.teacher_params = load_teacher(o.teacher)
            t = self.teacher_config
            check(t.vocab_size == student.vocab_size,
                   f"the teacher's vocabulary has {t.vocab_size} rows and the student's "
                   f"{student.vocab_size}; both must use the same data.vocab_path")
            if o.alpha_hidden_mse or o.alpha_attention:
                D.layer_map(student.num_layers, t.num_layers)  # depths must divide
            check(not o.alpha_attention or t.num_heads == student.num_heads,
                   f"attention-map distillation compares heads one to one: the teacher has "
                   f"{t.num_heads}, the student {student.num_heads}")
            check(not o.alpha_cos or t.hidden_size == student.hidden_size,
                   "the cosine loss compares hidden states of equal width; use "
                   "alpha_hidden_mse (with its projection) when the widths differ")
        projection = bool(o.teacher and o.alpha_hidden_mse
                          and self.teacher_config.hidden_size != student.hidden_size)
        self.build = lambda rngs: DistillModel(student, rngs=rngs, teacher=self.teacher_config,
                                               projection=projection,
                                               movement=o.prune == "movement")
        abstract = nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)

    # ------------------------------------------------------------------ schema
    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "pooler": False, "nsp_head": False}

    @classmethod
    def objective_defaults(cls) -> dict:
        w = D.DistillWeights()
        return {**super().objective_defaults(), "layout": "full_sentences",
                "teacher": "", "init_from_teacher": True, **dataclasses.asdict(w),
                "quant_ema_decay": Q.EMA_DECAY, "prune": "none", "prune_sparsity": 0.0,
                "prune_begin": 0, "prune_end": 0}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o = c.objective
        D.DistillWeights(o.temperature, o.alpha_ce, o.alpha_mlm, o.alpha_cos,
                         o.alpha_hidden_mse, o.alpha_attention)
        check(bool(o.teacher) or not (o.alpha_ce or o.alpha_cos or o.alpha_hidden_mse
                                       or o.alpha_attention),
               "objective.teacher is empty but teacher losses have weight: set "
               "objective.teacher=WORKDIR or alpha_ce/alpha_cos/alpha_hidden_mse/"
               "alpha_attention=0")
        check(c.model.quantize != "int8", "model.quantize='int8' is for inference; train with "
               "'fake' and export with compress.quantize.to_int8")
        check(0.0 < o.quant_ema_decay < 1.0,
               f"objective.quant_ema_decay must lie in (0, 1), got {o.quant_ema_decay}")
        check(o.prune in P.METHODS, f"objective.prune must be one of {P.METHODS}, got "
               f"{o.prune!r}")
        check(0.0 <= o.prune_sparsity < 1.0,
               f"objective.prune_sparsity must lie in [0, 1), got {o.prune_sparsity}")
        check(0 <= o.prune_begin <= o.prune_end,
               f"objective.prune_begin/prune_end must satisfy 0 <= begin <= end, got "
               f"{o.prune_begin} and {o.prune_end}")

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        params = nnx.to_pure_dict(nnx.state(self.build(nnx.Rngs(params=key)), nnx.Param))
        if self.teacher_params is not None:
            params["teacher"] = jax.tree.map(jnp.asarray, self.teacher_params)
            if self.config.objective.init_from_teacher:
                params["student"] = D.distilbert_init(
                    self.teacher_params, self.teacher_config.num_layers, params["student"],
                    self.model_config.num_layers)
        return params

    def student(self, params: dict) -> EncoderModel:
        return self.model(params).student

    # ------------------------------------------------------------------ contract
    def _forward(self, model: EncoderModel, batch: dict, *, dropout: bool, key: jax.Array):
        w = self.weights
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     masked_positions=batch["positions"],
                     output_hidden_states=bool(w.alpha_hidden_mse),
                     output_attentions=bool(w.alpha_attention), enable_dropout=dropout,
                     rngs=nnx.Rngs(dropout=key))

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): the weighted distillation terms, or plain MLM."""
        if "teacher" in params:
            params = {**params, "teacher": jax.lax.stop_gradient(params["teacher"])}
        model = self.model(params)
        student = self._forward(model.student, batch, dropout=self._dropout(train), key=key)
        if not hasattr(model, "teacher"):
            sums = losses.cross_entropy_with_z_loss(
                student["mlm_logits"], batch["targets"], batch["target_weights"],
                z_loss=self.config.loss.z_loss, label_smoothing=self.config.loss.label_smoothing)
            return sums["loss"], sums
        teacher = self._forward(model.teacher, batch, dropout=False, key=key)
        features = {"targets": batch["targets"], "weights": batch["target_weights"],
                    "attention_mask": batch["attention_mask"]}
        sums = D.encoder_distillation(student, teacher, features, self.weights,
                                      getattr(model, "projection", None))
        return sums["loss"], sums

    def after_update(self, old: dict, new: dict, batch: dict, step: jax.Array) -> dict:
        """Non-gradient state after an applied update (see the module docstring)."""
        o = self.config.objective
        out = dict(new)
        if "teacher" in old:
            out["teacher"] = old["teacher"]
        student = new["student"]
        if self.model_config.quantize == "fake":
            seen = self._forward(self.student(old), batch, dropout=False, key=jax.random.key(0))
            moved = Q.update_ranges(old["student"], seen["activation_absmax"], o.quant_ema_decay)
            student = _with_ranges(student, moved)
        if o.prune != "none":
            sparsity = P.cubic_sparsity(step + 1, o.prune_sparsity, o.prune_begin, o.prune_end)
            student, scores = P.apply_pruning(old["student"], student, old.get("scores"),
                                              method=o.prune, sparsity=sparsity)
            if scores is not None:
                out["scores"] = scores
        out["student"] = student
        return out


def _with_ranges(params: dict, source: dict) -> dict:
    """``params`` with every quantization range taken from ``source`` (same tree)."""
    return {k: (_with_ranges(v, source[k]) if isinstance(v, dict)
                else source[k] if k in _RANGES else v) for k, v in params.items()}
