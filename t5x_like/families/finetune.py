"""Fine-tuning families: text-to-text T5 / BART, and task heads on a BERT-style encoder.

Each starts from a pretrained checkpoint (``finetune.init_checkpoint``, a t5x-like workdir,
e.g. one written by ``t5x-like train`` or ``t5x-like import-hf``) and trains in the mode
``finetune.mode`` (``t5x_like.finetune``: full, feature, adapters, gradual, lora, prompt,
prefix). Parameters are ``{"model", "head", "peft"}``; the trainer honours frozen parts
through ``wrap_optimizer`` and saves only the trainable part through ``saved_state``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import UserError, check
from t5x_like.families.base import Family
from t5x_like.families.t5 import shift_right
from t5x_like.finetune import checkpoint as ft_checkpoint
from t5x_like.finetune import data as ft_data
from t5x_like.finetune import heads, modes, peft
from t5x_like.models.bart import Bart, BartConfig
from t5x_like.models.encoder import EncoderConfig, EncoderModel
from t5x_like.models.t5 import T5, T5Config
from t5x_like.tasks import play_lines  # noqa: F401  (registers the demo task)

FINETUNE_DEFAULTS = dict(
    mode="full",  # modes.MODES
    init_checkpoint="",  # workdir of the pretrained run ("" = random init, for tests)
    targets_length=8,  # target tokens kept (label words, answers)
    # encoder heads
    head="classification",  # heads.HEADS
    pooling="pooled",  # cls | pooled (tanh dense on [CLS], NSP-pretrained); feature: cls
    label_names=(),  # class words as the task's targets spell them
    max_answer_length=30,  # span QA decoding
    # feature-based
    feature_layer=-1,  # hidden state read (0 = embeddings, -1 = last layer)
    feature_weighted_sum=False,  # ELMo: softmax-weighted sum of all layers x gamma
    # adapters / LoRA / prompt / prefix / gradual
    adapter_size=64,
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets=("query", "value"),
    prompt_length=100,
    prefix_length=10,
    prefix_hidden=512,
    stage_steps=100,
)


class Parts(nnx.Module):
    """The parameter container: ``model`` (pretrained), optional ``head`` and ``peft``."""


class _FinetuneFamily(Family):
    """What the text-to-text and encoder-head families share."""

    head_switches: dict = {}  # model-config fields a fine-tuned model overrides

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)  # self.graphdef: the pretrained module alone
        self.ft = config.finetune
        self.mode = self.ft.mode
        self.ids = special_tokens(vocabulary)
        self.dims = peft.dims_of(self.model_config)
        self.arch = peft.arch_of(self.module_class) if self.mode in modes.PEFT_MODES else None
        self.base_logical = nnx.to_pure_dict(nnx.get_partition_spec(self.abstract_params))
        self.base_shapes = nnx.to_pure_dict(self.abstract_params)
        self.lora_targets = []
        if self.mode == "lora":
            self.lora_targets = peft.lora_targets(self.base_logical, self.base_shapes,
                                                  tuple(self.ft.lora_targets))
        if self.mode == "prompt" and not self.arch.prompt:
            raise UserError(f"finetune.mode='prompt' supports T5 and BERT-style encoders, not "
                            f"{self.module_class.__name__}")
        abstract = nnx.eval_shape(lambda: self._parts(nnx.Rngs(0)))
        _, self.abstract_params = nnx.split(abstract, nnx.Param)

    # ------------------------------------------------------------------ schema
    @classmethod
    def config_sections(cls) -> dict:
        return {"finetune": dict(FINETUNE_DEFAULTS)}

    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "vocab_size": 0, **cls.head_switches}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        f = c.finetune
        modes.check_mode(f.mode)
        for name in ("targets_length", "adapter_size", "lora_rank", "prompt_length",
                     "prefix_length", "prefix_hidden", "stage_steps", "max_answer_length"):
            check(f[name] > 0, f"config field finetune.{name} must be positive, got {f[name]}")
        check(f.lora_alpha > 0, f"finetune.lora_alpha must be positive, got {f.lora_alpha}")
        check(all(isinstance(n, str) for n in f.label_names),
               f"finetune.label_names must be strings, got {f.label_names}")
        check(not (c.data.pack and f.mode == "prompt"), "finetune.mode='prompt' puts one soft "
               "prompt in front of each row, not each example: set --config.data.pack=false")
        for name, value in cls.head_switches.items():
            check(c.model[name] == value, f"config field model.{name} must be {value} when "
                   f"fine-tuning (the pretraining heads are not used)")
        cls.config_class.from_dict({**c.model.to_dict(), "vocab_size": c.model.vocab_size or 1})

    # ------------------------------------------------------------------ parameters
    def _head(self, rngs: nnx.Rngs):
        return None

    def _parts(self, rngs: nnx.Rngs) -> Parts:
        parts = Parts()
        parts.model = self.module_class(self.model_config, rngs=rngs)
        head = self._head(rngs)
        if head is not None:
            parts.head = head
        ft, arch, dims = self.ft, self.arch, self.dims
        if self.mode == "lora":
            parts.peft = peft.LoRA(self.base_logical, self.base_shapes, self.lora_targets,
                                   ft.lora_rank, rngs=rngs)
        elif self.mode == "adapters":
            parts.peft = peft.Adapters(arch, dims, ft.adapter_size, rngs=rngs)
        elif self.mode == "prefix":
            parts.peft = peft.Prefix(arch, dims, ft.prefix_length, ft.prefix_hidden, rngs=rngs)
        elif self.mode == "prompt":
            parts.peft = peft.Prompt(dims, ft.prompt_length, self._prompt_std, rngs=rngs)
        return parts

    _prompt_std = 1.0

    def init(self, key: jax.Array) -> dict:
        return nnx.to_pure_dict(nnx.state(self._parts(nnx.Rngs(params=key)), nnx.Param))

    @property
    def scan(self) -> bool:
        return self.model_config.scan_layers

    def tuned_model(self, params: dict):
        """(merged model with PEFT installed, the prompt embedder or None)."""
        model_params = params["model"]
        if self.mode in modes.FROZEN_MODEL_MODES:  # no backward pass into frozen weights
            model_params = jax.lax.stop_gradient(model_params)
        if self.mode == "lora":
            scale = self.ft.lora_alpha / self.ft.lora_rank
            model_params = peft.apply_lora(model_params, params["peft"], self.base_logical,
                                           self.lora_targets, scale)
        model = nnx.merge(self.graphdef, model_params)
        prompt = None
        if self.mode == "adapters":
            peft.install_adapters(model, self.arch, params["peft"]["params"], self.scan)
        elif self.mode == "prefix":
            peft.install_prefix(model, self.arch, params["peft"]["params"], self.scan)
        elif self.mode == "prompt":
            prompt = peft.install_prompt(model, self.arch, params["peft"]["embeddings"])
        return model, prompt

    # ------------------------------------------------------------------ trainer hooks
    def wrap_optimizer(self, tx):
        """Frozen leaves: no update, no state; gradual unfreezing: stage gates."""
        params = jax.eval_shape(self.init, jax.random.key(0))
        stages = None
        if self.mode == "gradual":
            stages, _ = modes.layer_stages(params, self.arch_stacks, self.dims.layers, self.scan)
        return modes.optimizer(tx, params, self.mode, stages=stages,
                               stage_steps=self.ft.stage_steps)

    @property
    def arch_stacks(self) -> tuple[str, ...]:
        return ("encoder", "decoder") if hasattr(self.model_config, "d_model") else ("encoder",)

    def saved_state(self, state: dict) -> dict:
        return ft_checkpoint.saved_state(state, self.mode)

    def load_pretrained(self, params: dict, shardings: dict) -> dict:
        """``params`` with ``model`` read from ``finetune.init_checkpoint`` (leaves the
        pretrained run lacks, such as a pooler, keep their fresh init and are named)."""
        if not self.ft.init_checkpoint:
            print("note: finetune.init_checkpoint is empty: the model starts from random "
                  "weights", flush=True)
            return params
        pretrained = self._pretrained_model_params()
        fresh = params["model"]
        missing: list[str] = []

        def take(path, ours):
            keys = tuple(getattr(k, "key", k) for k in path)
            try:
                theirs = peft.get_path(pretrained, keys)
            except (KeyError, TypeError):
                missing.append(peft.key_of(keys))
                return ours
            if tuple(theirs.shape) != tuple(ours.shape):
                raise UserError(f"pretrained parameter {'/'.join(map(str, keys))} has shape "
                                f"{tuple(theirs.shape)}, the fine-tuning model wants "
                                f"{tuple(ours.shape)}: set config.model like the pretrained run")
            return jnp.asarray(theirs, ours.dtype)

        merged = jax.tree_util.tree_map_with_path(take, fresh)
        if missing:
            print(f"note: {len(missing)} parameter(s) are not in {self.ft.init_checkpoint} and "
                  f"start from random weights: {', '.join(missing[:6])}", flush=True)
        return {**params, "model": jax.device_put(merged, shardings["model"])}

    def _pretrained_model_params(self) -> dict:
        from t5x_like.evaluation.driver import load_checkpoint

        exp, params, step = load_checkpoint(self.ft.init_checkpoint)
        theirs, ours = exp.config, self.config
        if theirs.data.vocab_path != ours.data.vocab_path:
            raise UserError(f"{self.ft.init_checkpoint} was trained with data.vocab_path="
                            f"{theirs.data.vocab_path!r}; set the same here")
        skip = set(self.head_switches) | {"dropout_rate", "hidden_dropout_rate",
                                          "attention_dropout_rate", "activation_dropout_rate",
                                          "scan_layers", "remat_policy", "dtype"}
        for name, value in theirs.model.items():
            if name not in skip and name in ours.model and ours.model[name] != value:
                raise UserError(f"{self.ft.init_checkpoint} has model.{name}={value!r}, this "
                                f"config {ours.model[name]!r}: pass --config.model.{name}="
                                f"{value!r}")
        if "discriminator" in params and "encoder" not in params:  # ELECTRA: keep the
            params = params["discriminator"]  # discriminator, drop the generator
        for part in ("student", "model"):  # a distillation run's student (distill, tinybert),
            if part in params and "encoder" not in params:  # a fine-tuned run's encoder
                params = params[part]
        if theirs.model.get("scan_layers") != ours.model.scan_layers:
            raise UserError(f"{self.ft.init_checkpoint} has model.scan_layers="
                            f"{theirs.model.get('scan_layers')}: pass the same value here")
        print(f"fine-tuning from step {step} of {self.ft.init_checkpoint}", flush=True)
        return jax.device_get(params)

    # ------------------------------------------------------------------ data
    packs = True  # data.pack: several examples per row (finetune.packing)

    def features(self, batch: dict, key: jax.Array) -> dict:
        """Labelled batches are ready: no objective runs on device."""
        return batch

    @staticmethod
    def packing_sums(*real: jax.Array) -> dict:
        """``packing/efficiency``: real tokens / row tokens over the given [B, L] masks."""
        return {"packing/efficiency": sum(jnp.sum(r > 0).astype(jnp.float32) for r in real),
                "packing/weight": jnp.asarray(float(sum(r.size for r in real)), jnp.float32)}

    @property
    def raw_length(self) -> int:
        return self.config.data.inputs_length


# =========================================================================== text-to-text


class T5FinetuneFamily(_FinetuneFamily):
    """Text-to-text fine-tuning: inputs -> targets with teacher forcing, greedy prediction.

    ``sequence/accuracy`` is the fraction of examples whose every target token is the
    argmax under teacher forcing, which is exactly greedy decoding's exact match.
    """

    module_class = T5
    config_class = T5Config

    def batches(self, *, split, batch_size, shuffle, repeat, skip_batches, shard_index,
                num_shards):
        return ft_data.text_to_text_batches(
            self.config.data.task, split=split, inputs_length=self.config.data.inputs_length,
            targets_length=self.ft.targets_length, batch_size=batch_size, seed=self.config.seed,
            shuffle=shuffle, repeat=repeat, skip_batches=skip_batches, shard_index=shard_index,
            num_shards=num_shards, pack=self.config.data.pack)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        check(c.finetune.mode != "feature", "finetune.mode='feature' reads encoder layers "
               "into a task head: use the bert_finetune family (configs/bert_classify.py)")

    def _encoder_tokens(self, inputs: jax.Array) -> jax.Array:
        """Prompt tuning: P placeholder ids (1, never padding) in front of the inputs."""
        if self.mode != "prompt":
            return inputs
        front = jnp.ones((inputs.shape[0], self.ft.prompt_length), inputs.dtype)
        return jnp.concatenate([front, inputs], axis=1)

    def _dropout(self, train: bool) -> bool:
        c = self.model_config
        rates = [getattr(c, n, 0.0) for n in ("dropout_rate", "attention_dropout_rate",
                                              "activation_dropout_rate")]
        return train and max(rates) > 0

    def logits(self, params: dict, inputs: jax.Array, decoder_inputs: jax.Array, *,
               train: bool = False, key: jax.Array | None = None,
               packed: dict | None = None) -> jax.Array:
        """Teacher-forced logits; ``packed`` holds a packed batch's ``*_segment_ids`` and
        ``*_positions`` (several examples a row, ``finetune.packing``)."""
        model, prompt = self.tuned_model(params)
        tokens = self._encoder_tokens(inputs)
        dropout = self._dropout(train)
        rngs = nnx.Rngs(dropout=key if key is not None else jax.random.key(0))
        enc_kw, dec_kw = {}, {}
        if packed is not None:
            enc_kw = {"encoder_segment_ids": packed["inputs_segment_ids"]}
            dec_kw = {**enc_kw, "decoder_segment_ids": packed["targets_segment_ids"]}
            if self.module_class is Bart:  # learned positions; T5's relative ones need none
                enc_kw["encoder_positions"] = packed["inputs_positions"]
                dec_kw["decoder_positions"] = packed["targets_positions"]
        if prompt is not None:
            prompt.active = True
        encoded = model.encode(tokens, enable_dropout=dropout, rngs=rngs, **enc_kw)
        if prompt is not None:
            prompt.active = False
        return model.decode(encoded, tokens, decoder_inputs, enable_dropout=dropout, rngs=rngs,
                            **dec_kw)

    def _teacher_forced(self, params: dict, batch: dict, *, train: bool = False,
                        key: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """(logits, the targets' segment ids or None): a packed batch's decoder inputs restart
        at the start token in each example, as seqio's ``autoregressive_inputs``."""
        targets = batch["targets"]
        if "targets_segment_ids" not in batch:
            return self.logits(params, batch["inputs"], shift_right(targets), train=train,
                               key=key), None
        segments = batch["targets_segment_ids"]
        decoder_inputs = jnp.where(shift_right(segments) == segments, shift_right(targets), 0)
        return self.logits(params, batch["inputs"], decoder_inputs, train=train, key=key,
                           packed=batch), segments

    @staticmethod
    def _per_example(values: jax.Array, segments: jax.Array) -> jax.Array:
        """Sums of [B, T] ``values`` per example slot [B, M] of packed rows (M = T, the row's
        target length: every example holds at least one target token, so no row holds more
        examples; scoring packs wider target rows than training's ``targets_length``)."""
        slots = jax.nn.one_hot(segments - 1, segments.shape[-1], dtype=jnp.float32)
        return jnp.einsum("bt,btm->bm", values.astype(jnp.float32), slots)

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        targets = batch["targets"]
        logits, segments = self._teacher_forced(params, batch, train=train, key=key)
        weights = targets > 0
        sums = losses.cross_entropy_with_z_loss(logits, targets, weights,
                                                z_loss=self.config.loss.z_loss,
                                                label_smoothing=self.config.loss.label_smoothing)
        hit = (jnp.argmax(logits, -1) == targets) | ~weights
        if segments is None:
            rows = jnp.any(weights, axis=-1).astype(jnp.float32)
            sums["sequence/correct"] = jnp.sum(jnp.all(hit, axis=-1) * rows)
            sums["sequence/weight"] = jnp.sum(rows)
            sums.update(self.packing_sums(batch["inputs"], targets))
        else:  # one sequence per example, not per row
            has = self._per_example(weights, segments) > 0
            wrong = self._per_example(~hit, segments)
            sums["sequence/correct"] = jnp.sum((wrong == 0) & has).astype(jnp.float32)
            sums["sequence/weight"] = jnp.sum(has).astype(jnp.float32)
            sums.update(self.packing_sums(batch["inputs_segment_ids"], segments))
        return sums["loss"], sums

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        """log p(targets | inputs): [B] per row, or [B, M] per example slot of packed rows
        (M = the rows' target length; empty slots score 0)."""
        targets = features["targets"]
        logits, segments = self._teacher_forced(params, features)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
        token = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
        if segments is not None:
            return self._per_example(token * (targets > 0), segments)
        return jnp.sum(token * (targets > 0), axis=-1)

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        """Greedy decoding with the KV cache (prompts and prefixes included)."""
        model, prompt = self.tuned_model(params)
        if prompt is not None:
            model = _Prompted(model, prompt, self.ft.prompt_length)
        return decoding.greedy_decode(model, features["inputs"], max_length=max_length,
                                      eos_id=self.ids.eos)


class _Prompted(nnx.Module):
    """An encoder-decoder whose encoder sees the soft prompt (for ``decoding``)."""

    def __init__(self, model: nnx.Module, prompt: peft.PromptedEmbed, length: int):
        self.model, self.prompt, self.length = model, prompt, length

    def _tokens(self, inputs):
        return jnp.concatenate([jnp.ones((inputs.shape[0], self.length), inputs.dtype), inputs],
                               axis=1)

    def encode(self, inputs):
        self.prompt.active = True
        encoded = self.model.encode(self._tokens(inputs))
        self.prompt.active = False
        return encoded

    def init_cache(self, *args, **kwargs):
        return self.model.init_cache(*args, **kwargs)

    def decode_step(self, encoded, inputs, token_ids, cache, position):
        return self.model.decode_step(encoded, self._tokens(inputs), token_ids, cache, position)


class BartFinetuneFamily(T5FinetuneFamily):
    """BART text-to-text (full, gradual, LoRA, adapters, prefix; no prompt tuning)."""

    module_class = Bart
    config_class = BartConfig


# =========================================================================== encoder heads


class EncoderFinetuneFamily(_FinetuneFamily):
    """A head on a BERT / RoBERTa / ALBERT / ELECTRA encoder (``finetune.head``)."""

    module_class = EncoderModel
    config_class = EncoderConfig
    head_switches = dict(mlm_head=False, nsp_head=False, discriminator_head=False,
                         sbo_head=False)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        f = c.finetune
        check(f.head in heads.HEADS, f"config field finetune.head={f.head!r} is not one of "
               f"{heads.HEADS}")
        check(f.pooling in heads.POOLINGS, f"config field finetune.pooling={f.pooling!r} is "
               f"not one of {heads.POOLINGS}")
        check(f.pooling == "cls" or c.model.pooler,
               "finetune.pooling='pooled' needs model.pooler=True; or set finetune.pooling='cls'")
        if f.head in ("classification", "token_classification"):
            check(len(f.label_names) >= 2, f"finetune.head={f.head!r} needs at least two "
                   "finetune.label_names (the class words of the task's targets)")
        extra = f.prompt_length if f.mode == "prompt" else 0
        check(c.data.inputs_length + extra + c.model.position_offset
               <= c.model.max_position_embeddings,
               f"data.inputs_length={c.data.inputs_length} (+ {extra} prompt tokens) exceeds "
               f"model.max_position_embeddings={c.model.max_position_embeddings}")

    @property
    def _prompt_std(self) -> float:
        return self.model_config.initializer_range

    def _head(self, rngs: nnx.Rngs):
        c, f = self.model_config, self.ft
        return heads.Head(f.head, c.hidden_size, len(f.label_names),
                          num_states=c.num_layers + 1,
                          weighted_sum=f.mode == "feature" and f.feature_weighted_sum,
                          std=c.initializer_range, rngs=rngs)

    def _rows(self) -> ft_data.EncoderRows:
        roberta = self.model_config.model_type == "roberta"
        return ft_data.EncoderRows(
            head=self.ft.head, length=self.config.data.inputs_length,
            cls=self.ids.bos if roberta else self.ids.cls,
            sep=self.ids.eos if roberta else self.ids.sep, eos=self.ids.eos,
            vocabulary=self.vocabulary, label_names=tuple(self.ft.label_names))

    def batches(self, *, split, batch_size, shuffle, repeat, skip_batches, shard_index,
                num_shards):
        return ft_data.encoder_batches(
            self.config.data.task, self._rows(), split=split,
            targets_length=self.ft.targets_length, batch_size=batch_size,
            seed=self.config.seed, shuffle=shuffle, repeat=repeat, skip_batches=skip_batches,
            shard_index=shard_index, num_shards=num_shards, pack=self.config.data.pack)

    def _with_prompt(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Prompt tuning: P placeholder slots after [CLS] (replaced by the soft prompt)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.mode != "prompt":
            return ids, mask
        p, rows = self.ft.prompt_length, ids.shape[0]
        ids = jnp.concatenate([ids[:, :1], jnp.full((rows, p), self.ids.sep, ids.dtype),
                               ids[:, 1:]], axis=1)
        mask = jnp.concatenate([mask[:, :1], jnp.ones((rows, p), mask.dtype), mask[:, 1:]], 1)
        return ids, mask

    def outputs(self, params: dict, batch: dict, *, train: bool = False,
                key: jax.Array | None = None) -> jax.Array:
        """Head outputs: [B, C] per sequence or [B, L, C] per token (prompt slots removed);
        packed rows: [B, M, C] per example slot, read at each example's own [CLS]."""
        model, _ = self.tuned_model(params)
        ids, mask = self._with_prompt(batch)
        c = self.model_config
        dropout = train and max(c.hidden_dropout_rate, c.attention_dropout_rate) > 0
        feature = self.mode == "feature"
        out = model(ids, mask, output_hidden_states=feature, enable_dropout=dropout,
                    rngs=nnx.Rngs(dropout=key if key is not None else jax.random.key(0)),
                    segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
        head = params["head"]
        if feature:
            x = heads.mix_layers(out["hidden_states"], head, self.ft.feature_layer)
        else:
            x = out["last_hidden_state"]
        if self.mode == "prompt":
            p = self.ft.prompt_length
            x = jnp.concatenate([x[:, :1], x[:, 1 + p:]], axis=1)
        if self.ft.head in ("token_classification", "span_qa"):
            return heads.logits(head, x)
        if "cls_positions" in batch:
            cls = jnp.take_along_axis(x, batch["cls_positions"][..., None], axis=1)
            pooled = model.pool(cls) if self.ft.pooling == "pooled" and not feature else cls
            return heads.logits(head, pooled)
        pooled = out["pooled_output"] if self.ft.pooling == "pooled" and not feature else x[:, 0]
        return heads.logits(head, pooled)

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        out = self.outputs(params, batch, train=train, key=key)
        kind = self.ft.head
        flat = lambda x: x.reshape(-1, *x.shape[2:]) if "segment_ids" in batch else x  # noqa: E731
        if kind == "classification":
            sums = heads.classification_sums(flat(out), flat(batch["label"]),
                                             flat(batch["valid"]))
        elif kind == "regression":
            sums = heads.regression_sums(flat(out), flat(batch["label"]), flat(batch["valid"]))
        elif kind == "token_classification":
            sums = heads.token_classification_sums(out, batch["token_labels"])
        elif "segment_ids" in batch:  # span logits of each slot over its own example only
            slots = batch["valid"].shape[1]
            own = batch["segment_ids"][:, None, :] == jnp.arange(1, slots + 1)[None, :, None]
            per_slot = jnp.broadcast_to(out[:, None], (out.shape[0], slots, *out.shape[1:]))
            sums = heads.span_sums(flat(per_slot), flat(own), flat(batch["start"]),
                                   flat(batch["end"]), flat(batch["valid"]))
        else:
            sums = heads.span_sums(out, batch["attention_mask"], batch["start"], batch["end"],
                                   batch["valid"])
        sums.update(self.packing_sums(batch["attention_mask"]))
        return sums["loss"], sums

    def predict_batch(self, params: dict, features: dict, *, max_length: int = 0) -> jax.Array:
        """Class ids [B], regression values [B], token class ids [B, L] or spans [B, 2]."""
        out = self.outputs(params, features)
        kind = self.ft.head
        if kind == "regression":
            return out[:, 0]
        if kind == "span_qa":
            return heads.best_span(out, features["attention_mask"], self.ft.max_answer_length)
        return jnp.argmax(out, axis=-1)
