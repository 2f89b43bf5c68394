"""T5X's gin bindings mapped onto our config: its T5 1.1 model files and pretrain / finetune /
eval / infer run files, read as they are (``gin_config`` parses; nothing of T5X is imported).

A binding is named by its configurable's last name and argument (``T5Config.emb_dim``, whatever
alias the file imported ``network`` under) and, for ``DatasetConfig``, its scope (``train/``,
``train_eval/``, ``infer_eval/``). Each is mapped to a field, accepted because its value is what
we do anyway (``Adafactor.decay_rate = 0.8``; references that only wire T5X's objects together),
or returned in the list the caller prints as one warning. A value we cannot express safely (a
learning-rate schedule we do not have) stops the run in one sentence instead.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from t5x_like import config as config_lib
from t5x_like.errors import UserError
from t5x_like.gin_parse import REQUIRED, Parsed, Ref, resolve

# Module aliases of T5X / seqio gin files; bindings under them are T5X's even without imports.
MODULES = {"network", "models", "utils", "partitioning", "trainer", "adafactor", "seqio",
           "train_script", "eval_script", "infer_script", "gin_utils", "optimizers", "decoding",
           "__main__", "gin"}

# T5X binding -> our field, value as is.
FIELDS = {
    "T5Config.vocab_size": "model.vocab_size",
    "T5Config.emb_dim": "model.d_model",
    "T5Config.num_heads": "model.num_heads",
    "T5Config.num_encoder_layers": "model.num_encoder_layers",
    "T5Config.num_decoder_layers": "model.num_decoder_layers",
    "T5Config.head_dim": "model.d_kv",
    "T5Config.mlp_dim": "model.d_ff",
    "T5Config.dropout_rate": "model.dropout_rate",
    "EncoderDecoderModel.z_loss": "loss.z_loss",
    "EncoderDecoderModel.label_smoothing": "loss.label_smoothing",
    "SaveCheckpointConfig.period": "train.checkpoint_every",
    "PjitPartitioner.num_partitions": "mesh.tensor",
    "train.total_steps": "train.num_steps",
    "train.eval_steps": "train.eval_batches",
    "train.eval_period": "train.eval_every",
    "SentencePieceVocabulary.sentencepiece_model_file": "data.vocab_path",
}
# T5X macros mapped directly too, so a model file plus --gin.TRAIN_STEPS=... works without a
# run file (with one, the bindings that use them carry the same values).
MACROS = {
    "TRAIN_STEPS": "train.num_steps",
    "BATCH_SIZE": "data.batch_size",
    "MIXTURE_OR_TASK_NAME": "data.task",
    "DROPOUT_RATE": "model.dropout_rate",
    "Z_LOSS": "loss.z_loss",
    "LABEL_SMOOTHING": "loss.label_smoothing",
    "EVAL_STEPS": "train.eval_batches",
    "EVAL_PERIOD": "train.eval_every",
}
# Every T5X macro we read: a gin file of ours may set them too (--gin.TRAIN_STEPS=...).
RUN_MACROS = {*MACROS, "TASK_FEATURE_LENGTHS", "MODEL_DIR", "CHECKPOINT_PATH",
              "INITIAL_CHECKPOINT_PATH", "OPTIMIZER"}
# Accepted when they hold T5X's default, which is also what t5x-like does; listed otherwise.
SAME_AS_OURS = {
    "Adafactor.decay_rate": 0.8, "Adafactor.step_offset": 0,
    "T5Config.float32_attention_logits": False, "PjitPartitioner.model_parallel_submesh": None,
    "EncoderDecoderModel.loss_normalizing_factor": None, "SaveCheckpointConfig.dtype": "float32",
    "SaveCheckpointConfig.save_dataset": False, "RestoreCheckpointConfig.mode": "specific",
    "RestoreCheckpointConfig.dtype": "float32", "train.relative_steps": None,
    "train.use_hardware_rng": False, "DatasetConfig.module": None,
    "DatasetConfig.use_custom_packing_ops": False, "Trainer.num_microbatches": None,
}
# References that only wire T5X's objects together; what they point to is mapped on its own.
WIRING = {
    "Transformer.config", "EncoderDecoderModel.module", "EncoderDecoderModel.input_vocabulary",
    "EncoderDecoderModel.output_vocabulary", "Adafactor.logical_factor_rules",
    "PjitPartitioner.logical_axis_rules", "CheckpointConfig.restore", "CheckpointConfig.save",
    "Trainer.learning_rate_fn", "train.model", "train.train_dataset_cfg",
    "train.train_eval_dataset_cfg", "train.checkpoint_cfg", "train.partitioner",
    "train.trainer_cls", "train.summarize_config_fn", "evaluate.model", "evaluate.dataset_cfg",
    "evaluate.partitioner", "evaluate.restore_checkpoint_cfg", "infer.model",
    "infer.dataset_cfg", "infer.partitioner", "infer.restore_checkpoint_cfg",
}
_SCHEDULER = "create_learning_rate_scheduler"
# T5X's create_learning_rate_scheduler defaults, for the arguments a file leaves unbound.
_SCHEDULER_DEFAULTS = {"factors": "constant * linear_warmup * rsqrt_decay",
                       "base_learning_rate": 0.5, "warmup_steps": 1000}


def _split(key: str) -> tuple[str, str, str]:
    """(scope, module alias, ``Configurable.arg``) of a binding key."""
    scope, _, rest = key.rpartition("/")
    selector, _, arg = rest.rpartition(".")
    module, _, name = selector.rpartition(".")
    return scope, module or name, f"{name.rsplit('.', 1)[-1]}.{arg}"


def is_t5x(key: str, imports: set[str]) -> bool:
    """Whether a binding (not a macro) belongs to T5X's vocabulary."""
    if "." not in key.rpartition("/")[2]:
        return False
    _, module, _ = _split(key)
    return module in imports or module in MODULES or key.startswith(("__main__", "train/",
                                                                      "train_eval/",
                                                                      "infer_eval/"))


def known_keys() -> list[str]:
    """T5X binding names we map or accept (for the nearest-name hint of an unknown binding)."""
    return [*FIELDS, *MACROS, *SAME_AS_OURS, *WIRING, "T5Config.dtype",
            "T5Config.mlp_activations", "T5Config.logits_via_embedding",
            "DatasetConfig.mixture_or_task_name", "DatasetConfig.task_feature_lengths",
            "DatasetConfig.batch_size", "DatasetConfig.split", "TASK_FEATURE_LENGTHS",
            "MODEL_DIR", "INITIAL_CHECKPOINT_PATH", "CHECKPOINT_PATH"]


def family(parsed: Parsed) -> str:
    """``t5_finetune`` when the files train from an initial checkpoint (T5X's finetune.gin
    declares ``INITIAL_CHECKPOINT_PATH``), else ``t5`` (pretraining from scratch)."""
    if "INITIAL_CHECKPOINT_PATH" in parsed.bindings:
        return "t5_finetune"
    for key in parsed.bindings:
        if key.endswith("RestoreCheckpointConfig.path") and "CHECKPOINT_PATH" not in \
                parsed.bindings and parsed.value(key):
            return "t5_finetune"
    return "t5"


class _Mapper:
    def __init__(self, parsed: Parsed, config: ml_collections.ConfigDict, run: dict, verb: str):
        self.parsed, self.config, self.run, self.verb = parsed, config, run, verb
        self.unmapped: list[str] = []
        self.scheduler: dict[str, Any] = {}

    def set(self, field: str, value: Any, key: str) -> None:
        if value is REQUIRED:
            raise UserError(f"T5X gin binding {key} is %gin.REQUIRED; set it with "
                            f"--gin.{key}=VALUE")
        config_lib.apply_value(self.config, field, value)
        self.run.setdefault("_set_by", {})[field] = key

    def lengths(self, value: Any, key: str) -> None:
        if value is REQUIRED:
            raise UserError(f"T5X gin binding {key} is %gin.REQUIRED; pass e.g. "
                            "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 512, 'targets': 114}\"")
        if value is None:
            return
        if not isinstance(value, dict) or "inputs" not in value:
            raise UserError(f"T5X gin binding {key} must be a dict with 'inputs' (and "
                            f"'targets'), got {value!r}")
        self.set("data.inputs_length", value["inputs"], key)
        targets = value.get("targets")
        if targets is None:
            return
        if "finetune" in self.config:
            self.set("finetune.targets_length", targets, key)
            return
        from t5x_like.objectives import span_corruption_lengths

        o = self.config.objective
        derived = span_corruption_lengths(value["inputs"], o.noise_density,
                                          o.mean_noise_span_length)[1]
        if targets != derived:
            self.unmapped.append(f"TASK_FEATURE_LENGTHS['targets']={targets} (span "
                                 f"corruption derives {derived})")

    def binding(self, key: str, value: Any) -> None:
        scope, _, name = _split(key)
        if name in FIELDS:
            self.set(FIELDS[name], value, key)
        elif name in WIRING:
            pass
        elif name in SAME_AS_OURS:
            if value != SAME_AS_OURS[name]:
                self.unmapped.append(f"{key}={value!r}")
        elif name.startswith(f"{_SCHEDULER}."):
            self.scheduler[name.split(".", 1)[1]] = value
        elif name.startswith("T5Config."):
            self.model(name, value, key)
        elif name.startswith("DatasetConfig."):
            self.dataset(scope, name.split(".", 1)[1], value, key)
        elif name == "EncoderDecoderModel.optimizer_def":
            if not (isinstance(value, Ref) and value.name.endswith("Adafactor")):
                self.unmapped.append(f"{key}={value!r}")
            else:
                self.set("optimizer.name", "adafactor", key)
        elif name == "Trainer.num_microbatches":
            self.set("optimizer.grad_accum_steps", value, key)
        elif name == "train.random_seed":
            if value is not None:
                self.set("seed", value, key)
        elif name in ("train.model_dir", "evaluate.output_dir"):
            if value is not REQUIRED and value:
                self.run["workdir" if name == "train.model_dir" else "output_dir"] = value
        elif name == "RestoreCheckpointConfig.path":
            self.restore_path(value, key)
        elif name == "SaveCheckpointConfig.keep" and isinstance(value, int):
            self.set("train.keep_checkpoints", value, key)
        else:
            self.unmapped.append(f"{key}={_show(value)}")

    def model(self, name: str, value: Any, key: str) -> None:
        if name == "T5Config.dtype":
            self.set("model.dtype", {"bfloat16": "bfloat16", "float32": "float32"}.get(
                str(value), str(value)), key)
        elif name == "T5Config.mlp_activations":
            kinds = {("gelu", "linear"): "gated-gelu", ("relu",): "relu"}
            if tuple(value) not in kinds:
                raise UserError(f"{key}={value!r} has no t5x-like equivalent; T5 supports "
                                "('gelu', 'linear') (v1.1) and ('relu',) (v1.0)")
            self.set("model.feed_forward_proj", kinds[tuple(value)], key)
        elif name == "T5Config.logits_via_embedding":
            self.set("model.tie_word_embeddings", bool(value), key)
        else:  # T5Config has no other fields: a typo, which T5X would refuse too
            import difflib

            fields = [k.split(".", 1)[1] for k in known_keys() if k.startswith("T5Config.")]
            close = difflib.get_close_matches(name.split(".", 1)[1], fields, n=1)
            hint = f"; did you mean T5Config.{close[0]}?" if close else ""
            raise UserError(f"unknown gin binding {key!r}: T5X's T5Config has no such field{hint}")

    def dataset(self, scope: str, arg: str, value: Any, key: str) -> None:
        evaluating = self.verb in ("eval", "infer")
        if scope == "infer_eval" or (evaluating and scope) or (not evaluating and not scope):
            self.unmapped.append(f"{key}={_show(value)}")  # not this verb's dataset
            return
        if arg == "mixture_or_task_name":
            if evaluating:
                self.run["task"] = value
            else:
                self.set("data.task", value, key)
        elif arg == "task_feature_lengths":
            self.lengths(value, key)
        elif arg == "batch_size":
            self.set("data.batch_size", value, key)
        elif arg == "split" and (scope == "train_eval" or evaluating):
            if evaluating:
                self.run["split"] = value
            else:
                self.set("data.eval_split", value, key)
        elif (arg, scope, value) in (("split", "train", "train"), ("shuffle", "train", True),
                                     ("shuffle", "train_eval", False)):
            pass  # what our pipeline does
        elif arg == "pack" and scope == "train":
            if self.config.family == "t5":  # chunks of a token stream: full by construction
                if not value:
                    self.unmapped.append(f"{key}={value!r}")
            else:
                self.set("data.pack", bool(value), key)
        elif arg == "pack" and scope == "train_eval":
            if self.config.family != "t5" and bool(value) != self.config.data.pack:
                self.unmapped.append(f"{key}={value!r}")  # ours evaluates as it trains
        elif (arg, value) in (("use_cached", False), ("shuffle", False),
                              ("pack", False)) and evaluating:
            pass  # reading the raw task in order: what eval does
        else:
            self.unmapped.append(f"{key}={_show(value)}")

    def restore_path(self, value: Any, key: str) -> None:
        if isinstance(value, list):
            value = value[0] if value else None
        if not value or value is REQUIRED:
            if value is REQUIRED and "finetune" in self.config:
                raise UserError(f"T5X gin binding {key} is %gin.REQUIRED; pass "
                                "--gin.INITIAL_CHECKPOINT_PATH=WORKDIR")
            return
        if self.verb in ("eval", "infer"):
            self.run["checkpoint"] = value
        elif "finetune" in self.config:
            self.set("finetune.init_checkpoint", value, key)
        else:
            self.unmapped.append(f"{key}={value!r}")

    def apply_scheduler(self) -> None:
        if not self.scheduler:
            return
        s = {**_SCHEDULER_DEFAULTS, **self.scheduler}
        factors = frozenset(f.strip() for f in str(s["factors"]).split("*"))
        base, warmup = float(s["base_learning_rate"]), int(s["warmup_steps"])
        if factors == {"constant"}:
            values = dict(schedule="constant", learning_rate=base, warmup_steps=0)
        elif factors == {"constant", "rsqrt_decay"}:
            values = dict(schedule="rsqrt", learning_rate=base / math.sqrt(max(warmup, 1)),
                          warmup_steps=warmup)
        else:
            raise UserError(f"utils.{_SCHEDULER}.factors={s['factors']!r} has no t5x-like "
                            "equivalent; supported: 'constant' and 'constant * rsqrt_decay'")
        for field, value in values.items():
            self.set(f"optimizer.{field}", value, f"utils.{_SCHEDULER}")


def _show(value: Any) -> str:
    if isinstance(value, Ref):
        return f"@{value.name}{'()' if value.evaluate else ''}"
    if isinstance(value, list | tuple):
        return f"[{', '.join(_show(v) for v in value)}]"
    return repr(value)


def apply(parsed: Parsed, config: ml_collections.ConfigDict, run: dict, verb: str) -> list[str]:
    """Maps the T5X bindings of ``parsed`` onto ``config`` (and ``run``: workdir, checkpoint,
    task, split); returns the bindings with no equivalent, as ``key=value`` strings."""
    from t5x_like import presets

    m = _Mapper(parsed, config, run, verb)
    b = parsed.bindings
    names = [_split(k)[2] for k in b if is_t5x(k, parsed.imports)]
    if any(n.startswith("train.") for n in names):  # T5X's train(): a full-size run
        config.train.update(dict(presets.FULL_TRAIN))
    if verb == "train":
        for macro, field in MACROS.items():
            if macro in b:
                m.set(field, parsed.value(macro), macro)
        if "TASK_FEATURE_LENGTHS" in b:
            m.lengths(parsed.value("TASK_FEATURE_LENGTHS"), "TASK_FEATURE_LENGTHS")
        if "OPTIMIZER" in b:
            optimizer = parsed.value("OPTIMIZER")
            if isinstance(optimizer, Ref) and optimizer.name.endswith("Adafactor"):
                m.set("optimizer.name", "adafactor", "OPTIMIZER")
    for macro, slot in (("MODEL_DIR", "workdir"), ("CHECKPOINT_PATH", "checkpoint"),
                        ("MIXTURE_OR_TASK_NAME", "task")):
        value = parsed.value(macro) if macro in b else None
        if isinstance(value, str) and value and (slot != "task" or verb != "train"):
            run[slot] = value
    for key, raw in b.items():
        if is_t5x(key, parsed.imports):
            value = resolve(raw, b)
            _, _, name = _split(key)
            if verb != "train" and not (name.startswith(("DatasetConfig.", "Restore"))
                                        or name.endswith(".output_dir")):
                continue  # eval/infer read the model from the checkpoint's own config
            m.binding(key, value)
    m.apply_scheduler()
    if verb == "train" and "model.scan_layers" not in b and any(
            n.startswith("T5Config.") for n in names):
        # as our T5 presets: stacks of up to 12 layers unrolled (T5X's T5 is unrolled)
        config.model.scan_layers = config.model.num_encoder_layers > 12
    return list(dict.fromkeys(m.unmapped))  # once each, in order
