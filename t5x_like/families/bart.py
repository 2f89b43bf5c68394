"""BART and MASS: sequence-to-sequence denoisers on device -> the BART encoder-decoder.

Both families read raw chunks of ``inputs_length`` tokens from the packed stream (documents
joined by EOS), noise them inside the jitted step (``objectives.denoising`` / ``objectives.mass``,
one key per row) and train the same post-LN encoder-decoder (``models/bart.py``):

- **BART** reconstructs the whole chunk from its noised version: cross-entropy on every target
  position. The default objective is the paper's final recipe (``BART_PAPER``: text infilling
  of 30% with Poisson(3) spans + permutation of all sentences); token masking, deletion,
  infilling, sentence permutation and document rotation are each a config field and compose.
- **MASS** masks one contiguous fragment of ~50% in the encoder input; the decoder reads the
  fragment shifted right (other positions <mask>) and the loss is on the fragment only.

Sentence ends. The host stream carries no sentence markup, so sentence ends are read from the
vocabulary: every ordinary id whose text ends in one of ``objective.sentence_end_chars``
(default ".!?") closes a sentence, and so does an EOS (a document end inside the chunk). The
chunk's last sentence may be cut by the chunk boundary; it is permuted like the others.

Special ids come from ``data.special_tokens``, in one of two layouts:

- **our vocabularies** (SentencePiece, bytes, characters): <mask> is the top sentinel, padding
  is 0 and the decoder starts from 0 (as T5, so ``decoding.greedy_decode`` serves both); a row
  is the raw chunk as it is.
- **a Hugging Face tokenizer** (``data.vocab_path`` at an imported ``facebook/bart``-layout
  checkpoint's tokenizer, which ``import-hf`` sets): the tokenizer's <s>, </s>, <pad> and
  <mask>, and the checkpoint's ``decoder_start_token_id`` (BART: pad 1, BOS 0, EOS 2, start
  2). A row is ``<s> chunk </s>`` (the host chunk is ``inputs_length - 2`` tokens), as
  fairseq's BART rows and Hugging Face's ``tokenizer(text)`` labels are; BOS and the closing
  EOS are never noised; decoder inputs are transformers' ``shift_tokens_right(labels, pad,
  decoder_start)``; the loss skips padding (Hugging Face's -100 labels).

Random replacement (``random_ratio``) draws from the whole vocabulary except the special ids
(pad / EOS / <mask>, and <s> in the Hugging Face layout), sentinels included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t5x_like import decoding, losses
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import check
from t5x_like.families.base import Family
from t5x_like.models.bart import Bart, BartConfig
from t5x_like.objectives.denoising import BART_PAPER, BartNoise, TokenIds, bart_noise
from t5x_like.objectives.mass import START_PROBS, mass_fragment

_NOISE_FIELDS = ("mask_ratio", "delete_ratio", "infill_ratio", "poisson_lambda", "random_ratio",
                 "permute_sentences", "rotate_ratio")



def uses_hf_tokenizer(vocabulary) -> bool:
    """A Hugging Face tokenizer (``data.hf_vocab``) rather than one of our vocabularies."""
    return hasattr(vocabulary, "cls_id")


def shift_tokens_right(labels: jax.Array, pad_id: int, start_id: int) -> jax.Array:
    """Decoder inputs from labels [..., L]: ``start_id`` then ``labels[..., :-1]``, with any -100
    (Hugging Face's ignored label) read as ``pad_id``, as transformers' BART function."""
    start = jnp.full((*labels.shape[:-1], 1), start_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_id, shifted)


def sentence_end_ids(vocabulary, chars: str) -> tuple[int, ...]:
    """Ordinary ids whose decoded text ends (ignoring whitespace) in one of ``chars``."""
    low, high = special_tokens(vocabulary).ordinary
    out = []
    for i in range(low, high):
        text = vocabulary.decode([i]).strip()
        if text and text[-1] in chars:
            out.append(i)
    return tuple(out)


class BartFamily(Family):
    """BART pretrained by denoising (the paper's recipe by default)."""

    module_class = Bart
    config_class = BartConfig
    # import-hf points data.vocab_path at the checkpoint's own tokenizer (the HF layout above).
    trains_with_hf_tokenizer = True

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        ids = special_tokens(vocabulary)
        c = self.model_config
        self.hf_layout = uses_hf_tokenizer(vocabulary)
        check(c.pad_token_id == ids.pad,
               f"model.pad_token_id={c.pad_token_id} is not the vocabulary's padding id "
               f"{ids.pad}; set it to {ids.pad}")
        if self.hf_layout:
            check(0 <= c.decoder_start_token_id < c.vocab_size,
                   f"model.decoder_start_token_id={c.decoder_start_token_id} is not an id of "
                   f"the {c.vocab_size}-row embedding table")
            check(self.config.data.inputs_length >= 3,
                   f"data.inputs_length={self.config.data.inputs_length}: a row holds <s>, "
                   "at least one token and </s>; make it at least 3")
        else:
            check(c.decoder_start_token_id == 0,
                   f"model.decoder_start_token_id={c.decoder_start_token_id}: with this "
                   "vocabulary training shifts targets right behind 0 and decoding starts from "
                   "0; set it to 0 (or set data.vocab_path to the checkpoint's Hugging Face "
                   "tokenizer)")
        self.token_ids = TokenIds(mask=ids.mask, eos=ids.eos,
                                  bos=ids.bos if self.hf_layout else None, pad=ids.pad,
                                  vocab_size=self.vocab_size,
                                  sentence_end=self._sentence_ends(vocabulary))

    @property
    def raw_length(self) -> int:
        """Host tokens per row: ``inputs_length``, less <s> and </s> in the HF layout."""
        return self.config.data.inputs_length - (2 if self.hf_layout else 0)

    def _sentence_ends(self, vocabulary) -> tuple[int, ...]:
        if not self.config.objective.permute_sentences:
            return ()
        return sentence_end_ids(vocabulary, self.config.objective.sentence_end_chars)

    # ------------------------------------------------------------------ schema
    @classmethod
    def model_defaults(cls) -> dict:
        # vocab_size 0 = derive from the vocabulary; padding and the decoder start are id 0
        # (import-hf writes a Hugging Face checkpoint's own ids).
        return {**super().model_defaults(), "vocab_size": 0, "pad_token_id": 0,
                "decoder_start_token_id": 0}

    @classmethod
    def objective_defaults(cls) -> dict:
        paper = {name: getattr(BART_PAPER, name) for name in _NOISE_FIELDS}
        return dict(name="bart_denoising", sentence_end_chars=".!?", **paper)

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        o = c.objective
        check(o.name == "bart_denoising", f"objective.name {o.name!r} is not 'bart_denoising'")
        noise = BartNoise.from_dict({name: o[name] for name in _NOISE_FIELDS})
        check(noise != BartNoise(), "the BART objective applies no noise: set one of "
               "objective.mask_ratio, delete_ratio, infill_ratio, rotate_ratio or "
               "permute_sentences")
        check(not o.permute_sentences or bool(o.sentence_end_chars),
               "objective.sentence_end_chars is empty but permute_sentences is on; give the "
               "characters that end a sentence (e.g. '.!?')")
        cls._validate_model(c)

    @classmethod
    def _validate_model(cls, c: ml_collections.ConfigDict) -> None:
        m = c.model
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        check(c.data.inputs_length <= m.max_position_embeddings,
               f"data.inputs_length={c.data.inputs_length} exceeds "
               f"model.max_position_embeddings={m.max_position_embeddings}")
        BartConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    @property
    def noise(self) -> BartNoise:
        o = self.config.objective
        return BartNoise.from_dict({name: o[name] for name in _NOISE_FIELDS})

    # ------------------------------------------------------------------ objective
    def rows(self, tokens: jax.Array) -> jax.Array:
        """Host chunks [B, raw_length] -> target rows [B, inputs_length]: as they are, or
        ``<s> chunk </s>`` in the HF layout."""
        if not self.hf_layout:
            return tokens
        ids = self.token_ids
        edge = functools.partial(jnp.full, (tokens.shape[0], 1), dtype=tokens.dtype)
        return jnp.concatenate([edge(ids.bos), tokens, edge(ids.eos)], axis=1)

    def features(self, batch: dict, key: jax.Array) -> dict:
        """Raw chunks -> noised ``inputs``, original ``targets`` (+ weights, decoder inputs)."""
        tokens = self.rows(batch["tokens"])
        keys = jax.random.split(key, tokens.shape[0])
        row = functools.partial(bart_noise, noise=self.noise, ids=self.token_ids)
        out = jax.vmap(row)(keys, tokens)
        start = self.model_config.decoder_start_token_id
        return {"inputs": out["inputs"], "targets": out["targets"],
                "decoder_inputs": shift_tokens_right(out["targets"], self.token_ids.pad, start),
                "target_weights": out["target_weights"]}

    # ------------------------------------------------------------------ contract
    def _logits(self, params: dict, features: dict, *, train: bool, key: jax.Array | None):
        c = self.model_config
        dropout = max(c.dropout_rate, c.attention_dropout_rate, c.activation_dropout_rate) > 0
        return self.model(params)(
            features["inputs"], features["decoder_inputs"],
            enable_dropout=train and dropout,
            rngs=nnx.Rngs(dropout=key) if key is not None else None)

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): cross-entropy where ``target_weights`` is 1."""
        logits = self._logits(params, batch, train=train, key=key)
        sums = losses.cross_entropy_with_z_loss(
            logits, batch["targets"], batch["target_weights"],
            z_loss=self.config.loss.z_loss, label_smoothing=self.config.loss.label_smoothing)
        return sums["loss"], sums

    def score_batch(self, params: dict, features: dict) -> jax.Array:
        """Log-likelihood of each example's weighted targets (sum over its tokens)."""
        logits = self._logits(params, features, train=False, key=None)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        token = jnp.take_along_axis(logits, features["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum((token - log_z) * features["target_weights"], axis=-1)

    def predict_batch(self, params: dict, features: dict, *, max_length: int,
                      options: decoding.Options | None = None,
                      key: jax.Array | None = None) -> jax.Array:
        """Reconstruction of ``features['inputs']`` with the KV cache: greedy by default, beam
        search or sampling (needs ``key``) by ``options``."""
        return decoding.generate(self.model(params), features["inputs"], max_length=max_length,
                                 eos_id=self.token_ids.eos, pad_id=self.token_ids.pad,
                                 start_id=self.model_config.decoder_start_token_id,
                                 options=options or decoding.Options(), key=key)


class MassFamily(BartFamily):
    """MASS: one masked fragment (~50%) per chunk, predicted by the decoder."""

    trains_with_hf_tokenizer = False

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        check(not uses_hf_tokenizer(vocabulary),
               "MASS trains with our vocabularies' ids only; point data.vocab_path at a "
               "SentencePiece model (or leave it empty), not a Hugging Face tokenizer")
        super().__init__(config, vocabulary)

    def _sentence_ends(self, vocabulary) -> tuple[int, ...]:
        return ()

    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(name="mass", fragment_ratio=0.5, start_at_beginning=START_PROBS[0],
                    start_at_end=START_PROBS[1])

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        o = c.objective
        check(o.name == "mass", f"objective.name {o.name!r} is not 'mass'")
        check(0.0 < o.fragment_ratio <= 1.0,
               f"objective.fragment_ratio must lie in (0, 1], got {o.fragment_ratio}")
        check(o.start_at_beginning >= 0 and o.start_at_end >= 0
               and o.start_at_beginning + o.start_at_end <= 1.0,
               "objective.start_at_beginning and start_at_end are probabilities summing to at "
               f"most 1 (the rest starts uniformly), got {o.start_at_beginning} and "
               f"{o.start_at_end}")
        cls._validate_model(c)

    def features(self, batch: dict, key: jax.Array) -> dict:
        """Raw chunks -> encoder ``inputs`` with the fragment masked, ``decoder_inputs`` (the
        fragment shifted right), ``targets`` / ``target_weights`` on the fragment."""
        o = self.config.objective
        tokens = batch["tokens"]
        keys = jax.random.split(key, tokens.shape[0])
        probs = (o.start_at_beginning, o.start_at_end, 1.0 - o.start_at_beginning - o.start_at_end)
        row = functools.partial(mass_fragment, ids=self.token_ids,
                                fragment_ratio=o.fragment_ratio, start_probs=probs)
        out = jax.vmap(row)(keys, tokens)
        return {k: out[k] for k in ("inputs", "decoder_inputs", "targets", "target_weights")}

    def predict_batch(self, params: dict, features: dict, *, max_length: int,
                      options: decoding.Options | None = None,
                      key: jax.Array | None = None) -> jax.Array:
        """Decoding of ``features['inputs']`` as BART's, but from <mask>: in training the
        decoder reads <mask> before every fragment (never id 0), so a generated text is read
        as a fragment starting at position 0."""
        return decoding.generate(self.model(params), features["inputs"], max_length=max_length,
                                 eos_id=self.token_ids.eos, pad_id=self.token_ids.pad,
                                 start_id=self.token_ids.mask,
                                 options=options or decoding.Options(), key=key)
