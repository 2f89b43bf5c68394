"""TinyBERT's task-specific distillation (Jiao et al., 2020, section 3.2), through the
fine-tuning path: a fine-tuned BERT teacher distils into a TinyBERT student on a labelled
classification task, in the paper's two steps.

The student is the ``bert_finetune`` family's encoder and classification head (``finetune.*``,
``data.task``, ``data.pack`` as in ``configs/bert_classify.py``); ``finetune.init_checkpoint``
names where it starts: a general-distillation run (``configs/tinybert.py``, its student), or
the intermediate step's run of this family (its encoder). ``objective.teacher`` names a
``bert_finetune`` run on the same labels (``finetune.mode`` full or gradual, classification
head). Teacher and student read the same rows; the teacher is frozen in the train state (no
optimizer update, no optimizer state).

``objective.stage``:

- ``intermediate``: embedding-layer, hidden-state and attention-map MSE at the mapped layers
  (``tinybert.intermediate_sums``, the same terms as general distillation, over the task's real
  tokens), through the learned projections when the widths differ. The head is frozen (the
  paper's intermediate step does not train the prediction layer).
- ``prediction``: the soft cross-entropy between the student's and the teacher's class logits
  at temperature ``objective.temperature`` (Hinton's T^2 factor, equal to the paper's at its
  T = 1); everything of the student trains.
- ``both``: the sum, in one run.

``loss`` / ``weight`` is the per-example mean of the soft cross-entropy plus the per-token means
of the MSE terms; ``accuracy`` / ``cross_entropy`` are the student's against the gold labels
(the task metric ``t5x-like eval`` reports), ``teacher/accuracy`` the teacher's on the same
rows, ``tinybert/...`` each distillation term.

Differences from the paper: no data augmentation (its GloVe/BERT word-replacement expansion of
the training set); attention maps are compared after the softmax; classification heads only
(the paper's regression tasks use an MSE prediction loss, not built).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from t5x_like.compress import distill as D
from t5x_like.errors import UserError, check
from t5x_like.families import tinybert as T
from t5x_like.families.finetune import EncoderFinetuneFamily, Parts
from t5x_like.finetune import heads
from t5x_like.models.encoder import EncoderConfig, EncoderModel

TEACHER_MODES = ("full", "gradual")  # the teacher's whole encoder is in its checkpoint


def load_task_teacher(workdir: str, label_names: tuple, vocab_path: str
                      ) -> tuple[EncoderConfig, dict, str]:
    """(encoder config, ``{"model", "head"}`` params, pooling) of a fine-tuned classifier run."""
    from t5x_like import config as config_lib
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.experiment import build

    path = Path(workdir) / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("family") != "bert_finetune":
        raise UserError(f"objective.teacher={workdir!r} is not the workdir of a bert_finetune "
                        "run (configs/bert_classify.py); fine-tune the teacher there first")
    ft = saved["finetune"]
    if ft["mode"] not in TEACHER_MODES or ft["head"] != "classification":
        raise UserError(f"objective.teacher={workdir!r} was fine-tuned with finetune.mode="
                        f"{ft['mode']!r}, head={ft['head']!r}; the teacher must be a "
                        f"classification head fine-tuned in mode {' or '.join(TEACHER_MODES)}")
    if tuple(ft["label_names"]) != tuple(label_names):
        raise UserError(f"objective.teacher={workdir!r} predicts {tuple(ft['label_names'])}, "
                        f"this run {tuple(label_names)}: set the same finetune.label_names")
    if saved["data"]["vocab_path"] != vocab_path:
        raise UserError(f"objective.teacher={workdir!r} was trained with data.vocab_path="
                        f"{saved['data']['vocab_path']!r}; set the same here")
    # Its checkpoint holds every parameter (mode full or gradual): read them as saved, without
    # ``load_checkpoint``'s fresh initial state (a compile) for parts a frozen mode leaves out.
    config = config_lib.config_from_json(path)
    config_lib.validate(config)
    exp = build(config)
    checkpoints = Checkpoints(workdir, read_only=True)
    restored = checkpoints.restore_latest(exp.saved_state(exp.abstract_state()))
    checkpoints.close()
    if restored is None:
        raise UserError(f"objective.teacher={workdir!r} has no readable checkpoint; train the "
                        "teacher first")
    params = jax.device_get(restored[0]["params"])
    return (exp.family.model_config, {"model": params["model"], "head": params["head"]},
            ft["pooling"])


class TinyBertTaskFamily(EncoderFinetuneFamily):
    """A TinyBERT student fine-tuned by distillation from a fine-tuned teacher (module
    docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        o = config.objective
        self.stage = o.stage
        self.weights = TinyBertTaskFamily._weights(o).for_stage(o.stage)
        self.teacher_config, self.teacher_params, self.teacher_pooling = load_task_teacher(
            o.teacher, tuple(config.finetune.label_names), config.data.vocab_path)
        super().__init__(config, vocabulary)  # builds _parts, which needs the teacher's config
        s, t = self.model_config, self.teacher_config
        check(t.vocab_size == s.vocab_size, f"the teacher's vocabulary has {t.vocab_size} rows "
              f"and the student's {s.vocab_size}; both must use the same data.vocab_path")
        check(not self.weights.alpha_attention or t.num_heads == s.num_heads,
              f"attention distillation compares heads one to one: the teacher has "
              f"{t.num_heads}, the student {s.num_heads}; give the student "
              f"model.num_heads={t.num_heads}")
        # The prediction layer alone needs no layer pairs (nor a deeper teacher).
        self.mapping = (T.layer_mapping(s.num_layers, t.num_layers, o.layer_mapping)
                        if self._intermediate else None)
        abstract = nnx.eval_shape(lambda: EncoderModel(t, rngs=nnx.Rngs(0)))
        self.teacher_graphdef = nnx.split(abstract, nnx.Param)[0]
        abstract = nnx.eval_shape(lambda: T.projection(s, t, nnx.Rngs(0)))
        self.projection_graphdef = nnx.split(abstract, nnx.Param)[0]

    @staticmethod
    def _weights(o: ml_collections.ConfigDict) -> T.TinyBertWeights:
        return T.TinyBertWeights(o.alpha_embedding, o.alpha_hidden, o.alpha_attention,
                                 o.alpha_prediction, o.temperature)

    @property
    def _intermediate(self) -> bool:
        w = self.weights
        return bool(w.alpha_embedding or w.alpha_hidden or w.alpha_attention)

    # ------------------------------------------------------------------ schema
    @classmethod
    def objective_defaults(cls) -> dict:
        return {"teacher": "", "stage": "intermediate", "layer_mapping": "uniform",
                **dataclasses.asdict(T.TinyBertWeights())}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o, f = c.objective, c.finetune
        cls._weights(o)
        check(bool(o.teacher), "objective.teacher is empty: task-specific distillation needs a "
              "fine-tuned teacher; set objective.teacher=WORKDIR of a configs/bert_classify.py "
              "run")
        check(o.stage in T.STAGES, f"objective.stage must be one of {T.STAGES}, got {o.stage!r}")
        check(o.layer_mapping in T.MAPPINGS, f"objective.layer_mapping must be one of "
              f"{T.MAPPINGS}, got {o.layer_mapping!r}")
        check(f.mode == "full", f"finetune.mode={f.mode!r}: TinyBERT's task distillation trains "
              "the whole student; set finetune.mode=full")
        check(f.head == "classification", f"finetune.head={f.head!r}: task-specific "
              "distillation is built for classification heads (soft cross-entropy over classes)")
        check(c.model.quantize == "none", "TinyBERT trains a float student; quantize it "
              "afterwards with configs/distil_bert.py's model.quantize=fake")

    # ------------------------------------------------------------------ parameters
    def _parts(self, rngs: nnx.Rngs) -> Parts:
        parts = super()._parts(rngs)  # the student: model + head
        t = self.teacher_config
        parts.teacher = Parts()
        parts.teacher.model = EncoderModel(t, rngs=rngs)
        parts.teacher.head = heads.Head("classification", t.hidden_size,
                                        len(self.ft.label_names), num_states=t.num_layers + 1,
                                        weighted_sum=False, std=t.initializer_range, rngs=rngs)
        if self._intermediate and t.hidden_size != self.model_config.hidden_size:
            parts.embedding_projection = T.projection(self.model_config, t, rngs)
            parts.projection = T.projection(self.model_config, t, rngs)
        return parts

    def init(self, key: jax.Array) -> dict:
        params = super().init(key)
        ours, theirs = params["teacher"], self.teacher_params
        if jax.tree.structure(ours) != jax.tree.structure(theirs) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                                                   strict=True)):
            raise UserError(f"objective.teacher={self.config.objective.teacher!r} holds another "
                            "parameter layout than its own config describes")
        params["teacher"] = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), ours, theirs)
        return params

    def wrap_optimizer(self, tx):
        """The teacher (and, in the intermediate step, the head) frozen: no update, no state."""
        params = jax.eval_shape(self.init, jax.random.key(0))
        frozen = {"teacher", *(("head",) if self.stage == "intermediate" else ())}
        labels = {part: jax.tree.map(lambda _, p=part: "freeze" if p in frozen else "train",
                                     params[part]) for part in params}
        return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

    # ------------------------------------------------------------------ contract
    def _dropout(self, train: bool) -> bool:
        c = self.model_config
        return train and max(c.hidden_dropout_rate, c.attention_dropout_rate) > 0

    def _classify(self, model: EncoderModel, head: dict, pooling: str, batch: dict, *,
                  dropout: bool, key: jax.Array) -> tuple[dict, jax.Array]:
        """(encoder outputs, class logits [B, C], or [B, M, C] per slot of packed rows)."""
        w = self.weights
        out = model(batch["input_ids"], batch["attention_mask"],
                    output_hidden_states=bool(w.alpha_embedding or w.alpha_hidden),
                    output_attentions=bool(w.alpha_attention), enable_dropout=dropout,
                    rngs=nnx.Rngs(dropout=key), segment_ids=batch.get("segment_ids"),
                    positions=batch.get("positions"))
        x = out["last_hidden_state"]
        if "cls_positions" in batch:
            cls = jnp.take_along_axis(x, batch["cls_positions"][..., None], axis=1)
            return out, heads.logits(head, model.pool(cls) if pooling == "pooled" else cls)
        return out, heads.logits(head, out["pooled_output"] if pooling == "pooled" else x[:, 0])

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): the stage's TinyBERT terms (module docstring)."""
        teacher = jax.lax.stop_gradient(params["teacher"])
        student_model, _ = self.tuned_model(params)
        s_out, s_logits = self._classify(student_model, params["head"], self.ft.pooling, batch,
                                         dropout=self._dropout(train), key=key)
        t_model = nnx.merge(self.teacher_graphdef, teacher["model"])
        t_out, t_logits = self._classify(t_model, teacher["head"], self.teacher_pooling, batch,
                                         dropout=False, key=key)
        packed = "cls_positions" in batch
        flat = (lambda x: x.reshape(-1, *x.shape[2:])) if packed else (lambda x: x)  # noqa: E731
        labels, valid = flat(batch["label"]), flat(batch["valid"]).astype(jnp.float32)
        w = self.weights
        sums = D.task_distillation(flat(s_logits), flat(t_logits), labels, valid,
                                   temperature=w.temperature, alpha_soft=w.alpha_prediction,
                                   alpha_hard=0.0)  # the prediction-layer loss; gold CE metrics
        examples = sums["weight"]
        teacher_sums = heads.classification_sums(flat(t_logits), labels, valid)
        out = {"cross_entropy": sums["cross_entropy"], "correct": sums["correct"],
               "weight": examples, "teacher/correct": teacher_sums["correct"],
               "teacher/weight": examples, "tinybert/weight": examples}
        loss = sums["loss"]
        if w.alpha_prediction:
            out["tinybert/soft_cross_entropy"] = sums["soft_cross_entropy"]
        row_valid = jnp.max(batch["valid"], axis=1) if packed else batch["valid"]
        tokens = batch["attention_mask"].astype(jnp.float32) * row_valid[:, None]
        per_token = examples / jnp.maximum(jnp.sum(tokens), 1.0)  # token means, rescaled
        for name, value in T.intermediate_sums(
                s_out, t_out, tokens, w, self.mapping,
                self._projection(params, "embedding_projection"),
                self._projection(params, "projection")).items():
            out[f"tinybert/{name}"] = value * per_token
            loss += getattr(w, T.ALPHAS[name]) * out[f"tinybert/{name}"]
        out.update(self.packing_sums(batch["attention_mask"]))
        out["loss"] = loss
        return loss, out

    def _projection(self, params: dict, name: str):
        """The learned width map ``name`` (a ``Dense``), or None (equal widths)."""
        return nnx.merge(self.projection_graphdef, params[name]) if name in params else None
