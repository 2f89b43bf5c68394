"""TinyBERT (Jiao et al., 2020): layer-mapped Transformer distillation from a deeper teacher.

The student is the BERT family's encoder (``config.model``), fed by the BERT family's data and
masking (``objective.layout``, 15% 80/10/10, default ``full_sentences``); ``objective.teacher``
names the workdir of any encoder run with an MLM head (the general-distillation teacher: a
pretrained BERT). Teacher and student read the same masked batch. The loss is TinyBERT's sum:

- ``alpha_embedding`` * MSE(E_s W_e, E_t): the embedding-layer outputs, through a learned
  projection ``embedding_projection`` (student width -> teacher width);
- ``alpha_hidden`` * sum_m MSE(H_s^m W_h, H_t^g(m)): each student layer's output against the
  teacher layer g(m), through one learned projection ``projection`` (W_h);
- ``alpha_attention`` * sum_m (1/h) sum_heads MSE(A_s^m, A_t^g(m)): attention maps;
- ``alpha_prediction`` * soft cross-entropy of the MLM logits (temperature ``temperature``).

``objective.stage`` picks the terms: ``intermediate`` (embedding + attention + hidden: TinyBERT's
general distillation, and the first step of its task-specific distillation), ``prediction``
(the soft cross-entropy alone) or ``both``. ``objective.layer_mapping``: ``uniform``
(g(m) = m N/M, the paper's default), ``top`` (g(m) = N - M + m) or ``bottom`` (g(m) = m), the
paper's three strategies. ``objective.init_student`` starts the student from another run's
encoder (a previous TinyBERT stage's student, or any encoder), so the stages chain.
Task-specific distillation (a fine-tuned teacher, the fine-tuning path, the same intermediate
terms through ``intermediate_sums``) is ``families/tinybert_task.py``.

Normalisation: every MSE is a mean over the real (unpadded) tokens (and the hidden width, or
the heads and keys), rescaled like ``compress/distill.py``'s terms to the MLM weight the trainer
divides by, so ``loss`` is the paper's sum of means. The teacher is frozen in the train state
(``after_update`` copies it forward), as in the DistilBERT family.

Differences from the paper: attention maps are compared after the softmax (the paper fits the
unnormalised scores; the shared encoder returns probabilities); the soft cross-entropy carries
Hinton's T^2 (equal to the paper's at its T = 1); general distillation reads the default corpus,
not Wikipedia, and no data augmentation is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like import losses
from t5x_like.compress import distill as D
from t5x_like.errors import UserError, check
from t5x_like.families.bert import EncoderFamily
from t5x_like.models.encoder import Dense, EncoderConfig, EncoderModel

STAGES = ("intermediate", "prediction", "both")
MAPPINGS = ("uniform", "top", "bottom")


@dataclasses.dataclass(frozen=True)
class TinyBertWeights:
    """TinyBERT's loss weights (all 1 in the paper) and prediction-layer temperature."""

    alpha_embedding: float = 1.0
    alpha_hidden: float = 1.0
    alpha_attention: float = 1.0
    alpha_prediction: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserError(f"objective.temperature must be positive, got {self.temperature}")
        for f in dataclasses.fields(self):
            if f.name.startswith("alpha") and getattr(self, f.name) < 0:
                raise UserError(f"objective.{f.name} must be >= 0, got {getattr(self, f.name)}")

    def for_stage(self, stage: str) -> TinyBertWeights:
        """The weights with the terms ``stage`` leaves out set to 0."""
        if stage == "intermediate":
            return dataclasses.replace(self, alpha_prediction=0.0)
        if stage == "prediction":
            return dataclasses.replace(self, alpha_embedding=0.0, alpha_hidden=0.0,
                                       alpha_attention=0.0)
        return self


def layer_mapping(student_layers: int, teacher_layers: int, kind: str = "uniform") -> np.ndarray:
    """Teacher layer g(m) of each student layer m = 1..M (the embedding layer maps 0 -> 0)."""
    if kind not in MAPPINGS:
        raise UserError(f"objective.layer_mapping must be one of {MAPPINGS}, got {kind!r}")
    if student_layers > teacher_layers:
        raise UserError(f"the student has {student_layers} layers and the teacher "
                        f"{teacher_layers}; TinyBERT maps each student layer to a distinct "
                        "teacher layer, so the teacher must be at least as deep")
    m = np.arange(1, student_layers + 1)
    if kind == "uniform":
        return D.layer_map(student_layers, teacher_layers)[1:]
    return m + (teacher_layers - student_layers if kind == "top" else 0)


def intermediate_sums(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                      tokens: jax.Array, w: TinyBertWeights, mapping: np.ndarray,
                      embedding_projection=None, projection=None) -> dict[str, jax.Array]:
    """TinyBERT's intermediate-layer terms, each a sum over the real tokens (``tokens`` [B, L],
    1 = real) of that token's MSE: ``embedding_mse``, ``hidden_mse`` (summed over the mapped
    layers) and ``attention_mse`` (the same; heads averaged). Terms whose weight is 0 are left
    out. ``student``/``teacher`` hold ``hidden_states`` [M+1 | N+1, B, L, H] and ``attentions``
    [M | N, B, heads, L, L]; ``mapping``: g(m) for m = 1..M (``layer_mapping``). Shared by the
    general (masked-LM) and the task-specific (``tinybert_task``) distillation."""
    out = {}
    hs, ht = student.get("hidden_states"), teacher.get("hidden_states")
    if w.alpha_embedding:
        e = hs[0] if embedding_projection is None else embedding_projection(hs[0])
        out["embedding_mse"] = D.hidden_mse(e, ht[0], tokens)
    if w.alpha_hidden:
        h = hs[1:] if projection is None else projection(hs[1:])
        out["hidden_mse"] = sum(D.hidden_mse(h[m], ht[int(g)], tokens)
                                for m, g in enumerate(mapping))
    if w.alpha_attention:
        out["attention_mse"] = sum(
            D.attention_mse(student["attentions"][m], teacher["attentions"][int(g) - 1], tokens)
            for m, g in enumerate(mapping))
    return out


ALPHAS = {"embedding_mse": "alpha_embedding", "hidden_mse": "alpha_hidden",
          "attention_mse": "alpha_attention"}


def tinybert_distillation(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                          features: Mapping[str, jax.Array], w: TinyBertWeights,
                          mapping: np.ndarray, embedding_projection=None,
                          projection=None) -> dict[str, jax.Array]:
    """Metric sums of TinyBERT's loss from the two encoders' outputs.

    ``student``/``teacher``: ``mlm_logits`` [B, P, V], ``hidden_states`` [M+1 | N+1, B, L, H]
    and ``attentions`` [M | N, B, heads, L, L]; ``features``: ``targets`` / ``weights`` [B, P]
    and ``attention_mask`` [B, L]. ``mapping``: g(m) for m = 1..M (``layer_mapping``).
    """
    weights = features["weights"].astype(jnp.float32)
    sums = losses.cross_entropy_with_z_loss(student["mlm_logits"], features["targets"], weights)
    scored = sums["weight"]
    tokens = features["attention_mask"].astype(jnp.float32)
    per_token = scored / jnp.maximum(jnp.sum(tokens), 1.0)  # a token mean, rescaled to `scored`
    out = {"cross_entropy": sums["cross_entropy"], "correct": sums["correct"], "weight": scored,
           "tinybert/weight": scored}
    loss = jnp.zeros((), jnp.float32)
    for name, value in intermediate_sums(student, teacher, tokens, w, mapping,
                                         embedding_projection, projection).items():
        out[f"tinybert/{name}"] = value * per_token
        loss += getattr(w, ALPHAS[name]) * out[f"tinybert/{name}"]
    if w.alpha_prediction:
        soft = D.soft_target_cross_entropy(student["mlm_logits"], teacher["mlm_logits"], weights,
                                           w.temperature)
        out["tinybert/soft_cross_entropy"] = soft
        loss += w.alpha_prediction * soft
    out["loss"] = loss
    return out


def projection(student: EncoderConfig, teacher: EncoderConfig, rngs: nnx.Rngs) -> Dense:
    """A learned student -> teacher width map (TinyBERT's W_e, W_h), float whatever the
    student's quantization."""
    plain = dataclasses.replace(student, quantize="none")
    return Dense((student.hidden_size,), (teacher.hidden_size,), ("embed",), ("mlp",), plain,
                 rngs=rngs)


class TinyBertModel(nnx.Module):
    """Student encoder, frozen teacher and the two projections (student -> teacher width)."""

    def __init__(self, student: EncoderConfig, teacher: EncoderConfig | None, *,
                 rngs: nnx.Rngs):
        self.student = EncoderModel(student, rngs=rngs)
        if teacher is None:
            return
        self.teacher = EncoderModel(teacher, rngs=rngs)
        if teacher.hidden_size != student.hidden_size:
            self.embedding_projection = projection(student, teacher, rngs)
            self.projection = projection(student, teacher, rngs)


def load_encoder(workdir: str) -> tuple[EncoderConfig, dict]:
    """(config, params) of the encoder a workdir trained: a TinyBERT run's student, else what
    ``compress.distill``'s teacher loader accepts."""
    from pathlib import Path

    from t5x_like.evaluation.driver import load_checkpoint
    from t5x_like.families.distill import load_teacher

    if (Path(workdir) / "config.json").is_file():
        import json

        if json.loads((Path(workdir) / "config.json").read_text()).get("family") == "tinybert":
            exp, params, _ = load_checkpoint(workdir)
            return exp.family.model_config, jax.device_get(params)["student"]
    return load_teacher(workdir)


class TinyBertFamily(EncoderFamily):
    """Masked-LM rows distilled from a deeper teacher with TinyBERT's layer-wise losses."""

    objective_name = "tinybert"

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        o = config.objective
        self.weights = self._weights(o).for_stage(o.stage)
        student = self.model_config
        self.teacher_config, self.teacher_params = load_encoder(o.teacher)
        t = self.teacher_config
        check(t.vocab_size == student.vocab_size,
              f"the teacher's vocabulary has {t.vocab_size} rows and the student's "
              f"{student.vocab_size}; both must use the same data.vocab_path")
        check(not self.weights.alpha_attention or t.num_heads == student.num_heads,
              f"attention distillation compares heads one to one: the teacher has "
              f"{t.num_heads}, the student {student.num_heads}; give the student "
              f"model.num_heads={t.num_heads}")
        self.mapping = layer_mapping(student.num_layers, t.num_layers, o.layer_mapping)
        self.student_init = load_encoder(o.init_student)[1] if o.init_student else None
        abstract = nnx.eval_shape(lambda: TinyBertModel(student, t, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)

    @staticmethod
    def _weights(o: ml_collections.ConfigDict) -> TinyBertWeights:
        return TinyBertWeights(o.alpha_embedding, o.alpha_hidden, o.alpha_attention,
                               o.alpha_prediction, o.temperature)

    # ------------------------------------------------------------------ schema
    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "pooler": False, "nsp_head": False}

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "layout": "full_sentences", "teacher": "",
                "stage": "intermediate", "layer_mapping": "uniform", "init_student": "",
                **dataclasses.asdict(TinyBertWeights())}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o = c.objective
        cls._weights(o)
        check(bool(o.teacher), "objective.teacher is empty: TinyBERT distils from a teacher; set "
              "objective.teacher=WORKDIR of a trained encoder (e.g. configs/bert_mlm_nsp.py)")
        check(o.stage in STAGES, f"objective.stage must be one of {STAGES}, got {o.stage!r}")
        check(o.layer_mapping in MAPPINGS, f"objective.layer_mapping must be one of "
              f"{MAPPINGS}, got {o.layer_mapping!r}")
        check(c.model.quantize == "none", "TinyBERT trains a float student; quantize it "
              "afterwards with configs/distil_bert.py's model.quantize=fake")

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        model = TinyBertModel(self.model_config, self.teacher_config, rngs=nnx.Rngs(params=key))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        params["teacher"] = jax.tree.map(jnp.asarray, self.teacher_params)
        if self.student_init is not None:
            ours = params["student"]
            theirs = jax.tree.map(jnp.asarray, self.student_init)
            if jax.tree.structure(ours) != jax.tree.structure(theirs) or any(
                    a.shape != b.shape for a, b in zip(jax.tree.leaves(ours),
                                                       jax.tree.leaves(theirs), strict=True)):
                raise UserError(f"objective.init_student={self.config.objective.init_student!r} "
                                "holds an encoder of another shape than this student; give "
                                "both the same model settings")
            params["student"] = jax.tree.map(lambda a, b: b.astype(a.dtype), ours, theirs)
        return params

    def student(self, params: dict) -> EncoderModel:
        return self.model(params).student

    # ------------------------------------------------------------------ contract
    def _forward(self, model: EncoderModel, batch: dict, *, dropout: bool, key: jax.Array):
        w = self.weights
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     masked_positions=batch["positions"],
                     output_hidden_states=bool(w.alpha_embedding or w.alpha_hidden),
                     output_attentions=bool(w.alpha_attention), enable_dropout=dropout,
                     rngs=nnx.Rngs(dropout=key))

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): TinyBERT's weighted terms (module docstring)."""
        params = {**params, "teacher": jax.lax.stop_gradient(params["teacher"])}
        model = self.model(params)
        student = self._forward(model.student, batch, dropout=self._dropout(train), key=key)
        teacher = self._forward(model.teacher, batch, dropout=False, key=key)
        features = {"targets": batch["targets"], "weights": batch["target_weights"],
                    "attention_mask": batch["attention_mask"]}
        sums = tinybert_distillation(student, teacher, features, self.weights, self.mapping,
                                     getattr(model, "embedding_projection", None),
                                     getattr(model, "projection", None))
        return sums["loss"], sums

    def after_update(self, old: dict, new: dict, batch: dict, step: jax.Array) -> dict:
        """The teacher carried forward unchanged (no weight decay reaches it)."""
        return {**new, "teacher": old["teacher"]}
