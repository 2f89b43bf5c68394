"""MobileBERT (Sun et al., 2020): the BERT family's data, masking and MLM + NSP loss on the
MobileBERT body (``models/mobilebert.py``: bottlenecks, stacked FFNs, NoNorm, trigram
embeddings), and its progressive knowledge transfer (PKT) from an inverted-bottleneck teacher.

``mobilebert``: pretraining as ``bert`` does it (``objective.*`` are the BERT family's fields:
15% 80/10/10 masking at ``max_predictions`` slots, NSP rows), so the same batches and loss
arithmetic hold; only the module differs.

``mobilebert_pkt``: one stage of progressive knowledge transfer. ``objective.teacher`` names
the workdir of a ``mobilebert`` run with the same inter-block width, depth and heads (IB-BERT:
``intra_bottleneck_size`` above ``hidden_size``); ``objective.pkt_layer`` = l (1-based) is the
layer this stage trains. Loss = ``alpha_feature`` * feature-map transfer (MSE between the
student's and the teacher's layer-l outputs, over real tokens and the H features) +
``alpha_attention`` * attention transfer (KL(teacher || student) of layer l's attention
distributions, averaged over heads and real queries). Every parameter but layer l's is frozen:
gradients reach layer l alone and ``after_update`` restores the rest, so weight decay cannot
move them. Stage 1 (``objective.init_from_teacher``) copies the teacher's embeddings and heads
into the student (the paper shares them); stage l > 1 starts from stage l - 1's workdir
(``objective.init_student``).

``mobilebert_pd``: the paper's last stage, pre-training distillation (Sun et al., 2020, section
3.5): after the last PKT stage (``objective.init_student``) the whole student trains on
``L_PD = alpha * L_MLM + (1 - alpha) * L_KD + L_NSP``, where ``L_KD`` is KL(p_teacher || p_student)
of the MLM distributions at the masked slots (teacher and student read the same masked batch)
and ``alpha`` is ``objective.pd_alpha`` = 0.5, the value of the authors' distillation command
(``distill_ground_truth_ratio=0.5``, temperature 1, in google-research's mobilebert README; the
paper leaves it a hyperparameter in (0, 1)). Their code trains on the cross-entropy against the
mixture ``alpha * one_hot + (1 - alpha) * p_teacher``, which differs from this loss by the
teacher's entropy, a constant: the gradients are the same. Each term is a mean over the masked
slots (NSP over rows), as the BERT family's. The teacher is frozen in the train state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like import losses
from t5x_like.compress import distill as D
from t5x_like.errors import UserError, check
from t5x_like.families.bert import EncoderFamily
from t5x_like.models.mobilebert import MobileBertConfig, MobileBertModel


def load_mobilebert(workdir: str, what: str) -> tuple[MobileBertConfig, dict]:
    """(config, params) of the MobileBERT a ``mobilebert``, ``mobilebert_pkt`` or
    ``mobilebert_pd`` run trained (a distillation run's: its student)."""
    from t5x_like.evaluation.driver import load_checkpoint

    path = Path(workdir) / "config.json"
    family = json.loads(path.read_text()).get("family") if path.is_file() else None
    if family not in ("mobilebert", "mobilebert_pkt", "mobilebert_pd"):
        raise UserError(f"objective.{what}={workdir!r} is not the workdir of a mobilebert run "
                        "(no config.json naming family mobilebert, mobilebert_pkt or "
                        "mobilebert_pd)")
    exp, params, _ = load_checkpoint(workdir)
    params = jax.device_get(params)
    return exp.family.model_config, params["student"] if family != "mobilebert" else params


def _same_tree(ours: dict, theirs: dict, what: str) -> dict:
    if jax.tree.structure(ours) != jax.tree.structure(theirs) or any(
            np.shape(a) != np.shape(b)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True)):
        raise UserError(f"objective.{what} holds a MobileBERT of another shape than this one; "
                        "give both the same model settings")
    return jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), ours, theirs)


class MobileBertFamily(EncoderFamily):
    """MobileBERT pretraining with MLM + NSP (module docstring)."""

    module_class: ClassVar[type] = MobileBertModel
    config_class: ClassVar[type] = MobileBertConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        # Read here, not in ``init``: that runs under jax.jit, where no checkpoint can be read.
        o = config.objective
        self.student_init = (load_mobilebert(o.init_student, "init_student")[1]
                             if o.init_student else None)

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "init_student": ""}

    @classmethod
    def _validate_model(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        pairs = o.layout != "full_sentences"
        check(m.nsp_head == pairs,
              f"objective.layout={o.layout!r} needs model.nsp_head={pairs}")
        check(not o.span_boundary_objective, "MobileBERT has no span-boundary head; set "
              "objective.span_boundary_objective=False")
        check(c.data.inputs_length <= m.max_position_embeddings,
              f"data.inputs_length={c.data.inputs_length} exceeds "
              f"model.max_position_embeddings={m.max_position_embeddings}")
        check(m.mlm_head, "model.mlm_head=False leaves the MLM objective nothing to train")
        MobileBertConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    def init(self, key: jax.Array) -> dict:
        params = super().init(key)
        if self.student_init is not None:
            params = _same_tree(params, self.student_init, "init_student")
        return params


def feature_map_transfer(student: jax.Array, teacher: jax.Array, tokens: jax.Array) -> jax.Array:
    """Sum over real tokens of the MSE over features ([B, L, H] each; ``tokens`` [B, L])."""
    return D.hidden_mse(student, teacher, tokens)


def attention_transfer(student: jax.Array, teacher: jax.Array, tokens: jax.Array) -> jax.Array:
    """Sum over real queries of the head-mean KL(teacher || student) of attention rows
    ([B, heads, L, L] probabilities)."""
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    s = student.astype(jnp.float32)
    kl = jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, 1e-30))
                                       - jnp.log(jnp.maximum(s, 1e-30))), 0.0), axis=-1)
    return jnp.sum(jnp.mean(kl, axis=1) * tokens)


class PKTModel(nnx.Module):
    """The student MobileBERT and its frozen teacher, side by side in the train state (sharded
    and checkpointed with it, passed to the jitted step as an argument, never a constant)."""

    def __init__(self, student: MobileBertConfig, teacher: MobileBertConfig, *, rngs: nnx.Rngs):
        self.student = MobileBertModel(student, rngs=rngs)
        self.teacher = MobileBertModel(teacher, rngs=rngs)


def _layer_mask(a: jax.Array, index: int) -> jax.Array:
    """bool, broadcastable to a stacked parameter: True on layer ``index``'s slice."""
    return (jnp.arange(a.shape[0]) == index).reshape((-1,) + (1,) * (a.ndim - 1))


def only_layer(frozen: dict, moving: dict, index: int, scan: bool) -> dict:
    """``frozen``'s parameters with layer ``index`` taken from ``moving`` (pure dicts of a
    MobileBertModel, stacked or listed layers)."""
    if scan:
        layers = jax.tree.map(lambda a, b: jnp.where(_layer_mask(a, index), b, a),
                              frozen["layers"], moving["layers"])
    else:
        layers = {k: (moving["layers"][k] if int(k) == index else v)
                  for k, v in frozen["layers"].items()}
    return {**frozen, "layers": layers}


class MobileBertPKTFamily(MobileBertFamily):
    """One progressive-knowledge-transfer stage (module docstring)."""

    objective_name = "mobilebert_pkt"

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        o = config.objective
        self.teacher_config, self.teacher_params = load_mobilebert(o.teacher, "teacher")
        t, s = self.teacher_config, self.model_config
        for name in ("hidden_size", "num_layers", "num_heads", "vocab_size", "embedding_size",
                     "max_position_embeddings", "type_vocab_size"):
            check(getattr(t, name) == getattr(s, name),
                  f"PKT transfers layer by layer at the inter-block width: the teacher's "
                  f"{name} is {getattr(t, name)}, the student's {getattr(s, name)}")
        check(1 <= o.pkt_layer <= s.num_layers, f"objective.pkt_layer must lie in [1, "
              f"{s.num_layers}], got {o.pkt_layer}")
        abstract = nnx.eval_shape(lambda: PKTModel(s, t, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "teacher": "", "pkt_layer": 1,
                "alpha_feature": 1.0, "alpha_attention": 1.0, "init_from_teacher": True}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o = c.objective
        check(bool(o.teacher), "objective.teacher is empty: PKT transfers from a trained "
              "inverted-bottleneck teacher (a configs/mobilebert.py run, e.g. its :tiny_teacher "
              "preset)")
        check(min(o.alpha_feature, o.alpha_attention) >= 0 and
              o.alpha_feature + o.alpha_attention > 0,
              "objective.alpha_feature and alpha_attention must be >= 0, not both 0")

    # ------------------------------------------------------------------ parameters
    def init(self, key: jax.Array) -> dict:
        student = super().init(key)  # from init_student, when set
        o = self.config.objective
        if o.init_from_teacher and not o.init_student:
            for part in ("embeddings", "mlm", "pooler", "nsp"):
                if part in student and part in self.teacher_params:
                    student[part] = _same_tree(student[part], self.teacher_params[part],
                                               "teacher")
        return {"student": student, "teacher": jax.tree.map(jnp.asarray, self.teacher_params)}

    # ------------------------------------------------------------------ contract
    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): layer l's feature-map and attention transfer, with
        gradients for layer l's parameters only."""
        index = self.config.objective.pkt_layer - 1
        frozen = jax.lax.stop_gradient(params)
        student = only_layer(frozen["student"], params["student"], index,
                             self.model_config.scan_layers)
        model = self.model({"student": student, "teacher": frozen["teacher"]})
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        kwargs = dict(masked_positions=batch["positions"], output_hidden_states=True,
                      output_attentions=True)
        s = model.student(*inputs, **kwargs, enable_dropout=self._dropout(train),
                          rngs=nnx.Rngs(dropout=key))
        t = model.teacher(*inputs, **kwargs)
        tokens = batch["attention_mask"].astype(jnp.float32)
        fmt = feature_map_transfer(s["hidden_states"][index + 1], t["hidden_states"][index + 1],
                                   tokens)
        at = attention_transfer(s["attentions"][index], t["attentions"][index], tokens)
        o = self.config.objective
        real = jnp.sum(tokens)  # the trainer divides by it: token means
        sums = {"loss": o.alpha_feature * fmt + o.alpha_attention * at, "weight": real,
                "pkt/feature_mse": fmt, "pkt/attention_kl": at, "pkt/weight": real}
        return sums["loss"], sums

    def after_update(self, old: dict, new: dict, batch: dict, step: jax.Array) -> dict:
        """Everything but layer l as before the update (weight decay included)."""
        index = self.config.objective.pkt_layer - 1
        return {"student": only_layer(old["student"], new["student"], index,
                                      self.model_config.scan_layers),
                "teacher": old["teacher"]}


# ------------------------------------------------------------- pre-training distillation


def mlm_kd(student_logits: jax.Array, teacher_logits: jax.Array,
           weights: jax.Array) -> jax.Array:
    """Sum over the scored slots (``weights`` [B, P]) of KL(p_teacher || p_student) of the MLM
    distributions (logits [B, P, V]); no gradient reaches the teacher."""
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)))
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32))
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return jnp.sum(kl * weights.astype(jnp.float32))


class MobileBertPDFamily(MobileBertFamily):
    """Pre-training distillation, MobileBERT's last stage (module docstring)."""

    objective_name = "mobilebert_pd"

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        self.teacher_config, self.teacher_params = load_mobilebert(config.objective.teacher,
                                                                   "teacher")
        t, s = self.teacher_config, self.model_config
        check(t.vocab_size == s.vocab_size, f"the teacher's vocabulary has {t.vocab_size} rows "
              f"and the student's {s.vocab_size}; both must use the same data.vocab_path")
        check(t.mlm_head, "objective.teacher has no MLM head to distil from")
        abstract = nnx.eval_shape(lambda: PKTModel(s, t, rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_params = nnx.split(abstract, nnx.Param)

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "teacher": "", "pd_alpha": 0.5}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o = c.objective
        check(bool(o.teacher), "objective.teacher is empty: pre-training distillation needs the "
              "inverted-bottleneck teacher (a configs/mobilebert.py :tiny_teacher run)")
        check(0.0 <= o.pd_alpha <= 1.0, f"objective.pd_alpha must lie in [0, 1], got "
              f"{o.pd_alpha}")

    def init(self, key: jax.Array) -> dict:
        return {"student": super().init(key),  # from init_student (the last PKT stage), when set
                "teacher": jax.tree.map(jnp.asarray, self.teacher_params)}

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): alpha MLM + (1 - alpha) KD + NSP, each a mean."""
        model = self.model({"student": params["student"],
                            "teacher": jax.lax.stop_gradient(params["teacher"])})
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        s = model.student(*inputs, masked_positions=batch["positions"],
                          enable_dropout=self._dropout(train), rngs=nnx.Rngs(dropout=key))
        t = model.teacher(*inputs, masked_positions=batch["positions"])
        sums = self._head_sums(s, batch)  # MLM + NSP, the BERT family's
        weights = batch["target_weights"]
        mlm = losses.cross_entropy_with_z_loss(s["mlm_logits"], batch["targets"], weights,
                                               z_loss=self.config.loss.z_loss,
                                               label_smoothing=self.config.loss.label_smoothing)
        kd = mlm_kd(s["mlm_logits"], t["mlm_logits"], weights)
        alpha = self.config.objective.pd_alpha
        sums["loss"] = sums["loss"] + (1.0 - alpha) * (kd - mlm["loss"])  # alpha of the MLM left
        sums["pd/kl"], sums["pd/weight"] = kd, mlm["weight"]
        return sums["loss"], sums

    def after_update(self, old: dict, new: dict, batch: dict, step: jax.Array) -> dict:
        """The teacher carried forward unchanged (no weight decay reaches it)."""
        return {**new, "teacher": old["teacher"]}
