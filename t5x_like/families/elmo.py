"""ELMo: a bidirectional LSTM language model, and its layers as features for a task head.

Pretraining (``ElmoFamily``): chunks of ``inputs_length + 1`` tokens from the token stream;
the forward LM predicts token t + 1 from tokens <= t, the backward LM token t - 1 from tokens
>= t, through one token encoder and one softmax. The loss is the mean of the two directions'
cross-entropies per token (the paper maximises their sum, so the gradient is half of it);
``forward/`` and ``backward/`` metrics and perplexities are reported beside it. ``eval``'s
sliding-window perplexity scores the forward LM (``score_batch``), as GPT's does.

The char-CNN token encoder (``model.token_encoder='char_cnn'``) reads each token's characters
from a table built once from the vocabulary (a SentencePiece piece's text, a byte, a
character): [BOW, UTF-8 bytes..., EOW], cut to ``model.max_chars``.

Fine-tuning (``ElmoFinetuneFamily``, family ``elmo_finetune``): ``finetune.mode='feature'``
freezes the biLM and trains a head on ELMo's task-specific mix gamma * sum_k softmax(s)_k h_k
(``finetune.feature_weighted_sum``), or on one layer (``finetune.feature_layer``);
``mode='full'`` trains everything. Sequence heads read the mean of the row's token features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like import losses
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import check
from t5x_like.families.base import Family, summarize
from t5x_like.families.finetune import EncoderFinetuneFamily
from t5x_like.finetune import data as ft_data
from t5x_like.finetune import heads
from t5x_like.models.elmo import CHAR_BOW, CHAR_EOW, Elmo, ElmoConfig

DIRECTIONS = ("forward", "backward")


def token_texts(vocabulary) -> list[str]:
    """The text of every id below ``vocabulary.vocab_size``: SentencePiece pieces as spelt
    (with their word-start mark), bytes and characters as decoded, specials as ``<id_N>``."""
    size = vocabulary.vocab_size
    if hasattr(vocabulary, "tokenizer") and hasattr(vocabulary.tokenizer, "id_to_piece"):
        tok = vocabulary.tokenizer
        return [tok.id_to_piece(i) if i < tok.get_piece_size() else f"<id_{i}>"
                for i in range(size)]
    low, high = special_tokens(vocabulary).ordinary
    return [vocabulary.decode([i]) if low <= i < high else f"<id_{i}>" for i in range(size)]


def char_table(texts: list[str], rows: int, max_chars: int) -> np.ndarray:
    """int32 [rows, max_chars]: BOW, the UTF-8 bytes + 1, EOW, then 0 (padding); a token too
    long keeps its first ``max_chars - 2`` bytes (then EOW)."""
    table = np.zeros((rows, max_chars), np.int32)
    for i, text in enumerate(texts):
        body = [b + 1 for b in text.encode("utf-8")][: max_chars - 2]
        table[i, : len(body) + 2] = [CHAR_BOW, *body, CHAR_EOW]
    return table


class _ElmoInputs:
    """What both families share: the model's inputs for a batch of token ids."""

    def _setup_chars(self) -> None:
        c = self.model_config
        self.chars = None
        if c.token_encoder == "char_cnn":
            self.chars = char_table(token_texts(self.vocabulary), c.vocab_size, c.max_chars)

    def _char_ids(self, tokens: jax.Array) -> jax.Array | None:
        return None if self.chars is None else jnp.take(jnp.asarray(self.chars), tokens, axis=0)


class ElmoFamily(_ElmoInputs, Family):
    """The biLM pretrained on the token stream (module docstring)."""

    module_class = Elmo
    config_class = ElmoConfig

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        self.pad_id = special_tokens(vocabulary).pad
        self._setup_chars()

    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="bidirectional_lm")

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        check(c.objective.name == "bidirectional_lm",
              f"objective.name {c.objective.name!r} is not 'bidirectional_lm'")
        check(c.model.vocab_size >= 0,
              f"config field model.vocab_size must be >= 0, got {c.model.vocab_size}")
        ElmoConfig.from_dict({**c.model.to_dict(), "vocab_size": c.model.vocab_size or 1})

    @property
    def raw_length(self) -> int:
        return self.config.data.inputs_length + 1

    @property
    def perplexity_window(self) -> int:
        return self.raw_length

    def features(self, batch: dict, key: jax.Array) -> dict:
        """Chunks stay whole: each direction predicts inside them; padding weighs 0."""
        del key
        tokens = batch["tokens"]
        out = {"tokens": tokens, "mask": tokens != self.pad_id}
        if "weights" in batch:
            out["weights"] = batch["weights"]
        chars = self._char_ids(tokens)
        if chars is not None:
            out["chars"] = chars
        return out

    def _run(self, params: dict, f: dict, *, train: bool, key: jax.Array | None):
        model = self.model(params)
        c = self.model_config
        out = model(f["tokens"], mask=f["mask"], chars=f.get("chars"),
                    enable_dropout=train and c.dropout_rate > 0,
                    rngs=nnx.Rngs(dropout=key) if key is not None else None)
        return model, out

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, sums): loss = (forward CE + backward CE) / 2 per predicted token."""
        model, out = self._run(params, batch, train=train, key=key)
        tokens, mask = batch["tokens"], batch["mask"]
        pairs = {"forward": (out["forward"][-1][:, :-1], tokens[:, 1:], mask[:, 1:] & mask[:, :-1]),
                 "backward": (out["backward"][-1][:, 1:], tokens[:, :-1],
                              mask[:, :-1] & mask[:, 1:])}
        sums: dict[str, Any] = {}
        for name, (h, targets, weights) in pairs.items():
            s = losses.cross_entropy_with_z_loss(model.logits(h), targets, weights,
                                                 z_loss=self.config.loss.z_loss,
                                                 label_smoothing=self.config.loss.label_smoothing)
            for k, v in s.items():
                sums[f"{name}/{k}"] = v
        half = lambda k: (sums[f"forward/{k}"] + sums[f"backward/{k}"]) / 2  # noqa: E731
        sums.update(loss=half("loss"), cross_entropy=half("cross_entropy"),
                    correct=half("correct"), weight=sums["forward/weight"])
        return sums["loss"], sums

    def summarize(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        """Means, plus each direction's perplexity exp(mean cross-entropy)."""
        out = summarize(sums)
        for name in DIRECTIONS:
            if f"{name}/cross_entropy" in out:
                out[f"{name}/perplexity"] = jnp.exp(out[f"{name}/cross_entropy"])
        return out

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        """Forward-LM log-likelihood per row [N] of ``{'tokens', 'weights'}`` (``weights[n, i]``
        asks for log p(tokens[n, i] | tokens[n, :i]))."""
        f = self.features(features, None)
        model, out = self._run(params, f, train=False, key=None)
        logits = model.logits(out["forward"][-1][:, :-1])
        log_z = jax.nn.logsumexp(logits, axis=-1)
        token = jnp.take_along_axis(logits, f["tokens"][:, 1:, None], axis=-1)[..., 0]
        return jnp.sum((token - log_z) * f["weights"][:, 1:], axis=-1)


class ElmoFinetuneFamily(_ElmoInputs, EncoderFinetuneFamily):
    """A head on ELMo's features (module docstring): modes ``feature`` and ``full``."""

    module_class = Elmo
    config_class = ElmoConfig
    head_switches: dict = {}

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        self._setup_chars()

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        f = c.finetune
        check(f.mode in ("feature", "full"), f"finetune.mode={f.mode!r}: ELMo is fine-tuned "
              "with 'feature' (frozen biLM, the mix of its layers) or 'full'")
        check(f.head in ("classification", "token_classification"),
              f"finetune.head={f.head!r}: ELMo has classification and token_classification "
              "heads")
        check(not c.data.pack, "ELMo's sequence features average a row's tokens: set "
              "data.pack=false")
        check(len(f.label_names) >= 2, f"finetune.head={f.head!r} needs at least two "
              "finetune.label_names (the class words of the task's targets)")
        ElmoConfig.from_dict({**c.model.to_dict(), "vocab_size": c.model.vocab_size or 1})

    def _rows(self) -> ft_data.EncoderRows:
        return ft_data.EncoderRows(
            head=self.ft.head, length=self.config.data.inputs_length, cls=self.ids.cls,
            sep=self.ids.sep, eos=self.ids.eos, vocabulary=self.vocabulary,
            label_names=tuple(self.ft.label_names))

    def _head(self, rngs: nnx.Rngs):
        c, f = self.model_config, self.ft
        return heads.Head(f.head, c.hidden_size, len(f.label_names),
                          num_states=c.num_layers + 1,
                          weighted_sum=f.mode == "feature" and f.feature_weighted_sum,
                          std=0.02, rngs=rngs)

    def outputs(self, params: dict, batch: dict, *, train: bool = False,
                key: jax.Array | None = None) -> jax.Array:
        """Head outputs: [B, C] from the mean token feature, or [B, L, C] per token."""
        model, _ = self.tuned_model(params)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        c = self.model_config
        states = model.hidden_states(
            ids, mask=mask, chars=self._char_ids(ids),
            enable_dropout=train and c.dropout_rate > 0,
            rngs=nnx.Rngs(dropout=key if key is not None else jax.random.key(0)))
        head = params["head"]
        x = heads.mix_layers(states, head, self.ft.feature_layer)
        if self.ft.head == "token_classification":
            return heads.logits(head, x)
        m = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return heads.logits(head, pooled)
