"""The masked-LM encoder families: BERT, RoBERTa, ALBERT and SpanBERT — one class, by config.

Host side: the task's text is read through seqio (the task's own tokenisation, EOS stripped) as
documents of segments (``data/documents.py``; ``objective.examples_per_document`` says what a
document is), and ``data/sentence_pairs.py`` lays them out (``objective.layout``):
``nsp`` (BERT: ``[CLS] A [SEP] B [SEP]``, B random from another document with p = 0.5),
``sop`` (ALBERT: two consecutive segments, swapped with p = 0.5) or ``full_sentences``
(RoBERTa, SpanBERT: single rows of whole segments packed across documents).

Device side (``features``, inside the jitted step): ``objectives.masking.mask`` selects and
corrupts positions with the step key, a fresh mask every step (RoBERTa's dynamic masking).
``objective.static_masking=True`` instead keys each row by a hash of its tokens and the seed, so
a sequence gets the same mask whenever it is seen (BERT's masks made once in preprocessing,
without the 10 duplicates); a key from the data position would not do, since every epoch
re-pairs and reshuffles the rows. The MLM head runs only at the ``max_predictions`` selected
slots (``targets`` / ``target_weights`` [B, P]), as in the original code.

Loss = mean cross-entropy over all selected positions (also the kept and random ones)
+ the sentence-pair CE (NSP/SOP, mean over rows) + SpanBERT's span-boundary CE (mean over the
selected positions). The pair term is a per-row mean while the trainer divides by the MLM
weight, so each row's pair CE carries ``pair_scale`` = (MLM weight of the whole batch) / rows,
computed in ``features`` before any micro-batching: the division gives exactly MLM mean +
pair mean for any split into micro-batches or devices. Metrics: ``accuracy`` / ``cross_entropy``
(MLM), ``nsp/...`` or ``sop/...``, ``sbo/...``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like import losses
from t5x_like.data import lexicon, sentence_pairs, structure_pairs
from t5x_like.data.documents import task_documents
from t5x_like.data.special_tokens import special_tokens
from t5x_like.errors import UserError, check
from t5x_like.families.base import Family
from t5x_like.models.encoder import EncoderConfig, EncoderModel
from t5x_like.models.structbert import StructBertModel
from t5x_like.objectives.masking import MaskingConfig, mask, word_start_table
from t5x_like.objectives.spans import SPAN_KINDS, SpanLengths
from t5x_like.objectives.structural import WordStructure, shuffle_ngrams

LAYOUTS = ("nsp", "sop", "full_sentences", "sentence_structure")
_LABELS = {"nsp": "next_sentence_label", "sop": "sentence_order_label",
           "sentence_structure": structure_pairs.LABEL}
STATIC_MASKING_SALT = 0x57A71C  # folded into the seed key for static masks
WORD_SHUFFLE_SALT = 0x5B0FF1E  # folded into each row's masking key for StructBERT's shuffles


# --------------------------------------------------------------------------- host data


def word_starts_of(vocabulary) -> np.ndarray:
    """bool [vocab_size]: which ids open a word (for whole-word, n-gram and span masking)."""
    if hasattr(vocabulary, "sentencepiece_model_file"):
        tokenizer = vocabulary.tokenizer
        pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]
        pieces += [f"<extra_id_{i}>" for i in range(vocabulary.vocab_size - len(pieces))]
        return word_start_table(pieces, "sentencepiece")
    tokenizer = getattr(vocabulary, "tokenizer", None)
    if not hasattr(tokenizer, "id_to_token"):  # bytes, characters: no word pieces to group
        raise UserError(f"whole-word masking needs a SentencePiece or WordPiece vocabulary, not "
                        f"{type(vocabulary).__name__}; set objective.whole_word=False")
    pieces = [tokenizer.id_to_token(i) or "" for i in range(vocabulary.vocab_size)]
    if not any(p.startswith("##") for p in pieces):
        raise UserError("whole-word masking needs a SentencePiece or WordPiece vocabulary; set "
                        "objective.whole_word=False for this tokenizer")
    return word_start_table(pieces, "wordpiece")


def row_hashes(tokens: jax.Array) -> jax.Array:
    """uint32 [B]: a polynomial hash of each row's ids (static masking's per-row key)."""
    powers = jnp.cumprod(jnp.full((tokens.shape[1],), 16777619, jnp.uint32))
    return jnp.sum(tokens.astype(jnp.uint32) * powers[None], axis=1, dtype=jnp.uint32)


# --------------------------------------------------------------------------- the family


class EncoderFamily(Family):
    """BERT (MLM + NSP) by default; RoBERTa, ALBERT and SpanBERT are its presets below."""

    module_class: ClassVar[type] = EncoderModel
    config_class: ClassVar[type] = EncoderConfig
    objective_name: ClassVar[str] = "mlm"
    sentence_classes: ClassVar[int] = 2  # the pair head's classes (StructBERT: 3)

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        self.ids = special_tokens(vocabulary)
        o = config.objective
        self.masking = MaskingConfig(
            vocab_size=self.vocab_size, mask_id=self.ids.mask, special_ids=self.ids.all,
            max_predictions=self.max_predictions, rate=o.mlm_rate,
            mask_fraction=o.mask_fraction, random_fraction=o.random_fraction,
            random_range=self.ids.ordinary,
            spans=SpanLengths(o.spans, o.max_span_length, o.span_p),
            replace_per_span=o.replace_per_span, span_boundaries=o.span_boundary_objective)
        self.word_starts = word_starts_of(vocabulary) if o.whole_word else None

    # ------------------------------------------------------------------ schema
    @classmethod
    def objective_defaults(cls) -> dict:
        return dict(
            name=cls.objective_name,
            layout="nsp",  # nsp | sop | full_sentences
            mlm_rate=0.15,
            max_predictions=0,  # 0 = ceil(mlm_rate * inputs_length)
            mask_fraction=0.8,
            random_fraction=0.1,
            spans="single",  # single | ngram (ALBERT) | geometric (SpanBERT), in words
            max_span_length=1,
            span_p=0.2,  # geometric spans only
            whole_word=False,
            replace_per_span=False,  # one [MASK]/random/keep draw per span (SpanBERT)
            span_boundary_objective=False,  # SpanBERT's SBO loss (needs model.sbo_head)
            static_masking=False,
            short_seq_prob=0.1,  # pairs: a shorter target length with this probability
            examples_per_document=64,
            sentence_end_chars=".!?",
        )

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        o = c.objective
        check(o.name == cls.objective_name,
               f"objective.name {o.name!r} is not {cls.objective_name!r}")
        check(o.layout in LAYOUTS, f"objective.layout must be one of {LAYOUTS}, got {o.layout!r}")
        check(0.0 < o.mlm_rate < 1.0, f"objective.mlm_rate must lie in (0, 1), got {o.mlm_rate}")
        check(0 <= o.max_predictions <= c.data.inputs_length,
               f"objective.max_predictions must be in [0, data.inputs_length], got "
               f"{o.max_predictions}")
        check(min(o.mask_fraction, o.random_fraction) >= 0
               and o.mask_fraction + o.random_fraction <= 1.0,
               "objective.mask_fraction and random_fraction must be >= 0 and sum to at most 1, "
               f"got {o.mask_fraction} and {o.random_fraction}")
        check(o.spans in SPAN_KINDS, f"objective.spans must be one of {SPAN_KINDS}, got "
               f"{o.spans!r}")
        SpanLengths(o.spans, o.max_span_length, o.span_p)  # lengths and p, one sentence each
        check(0.0 <= o.short_seq_prob <= 1.0,
               f"objective.short_seq_prob must lie in [0, 1], got {o.short_seq_prob}")
        check(o.examples_per_document >= 0,
               f"objective.examples_per_document must be >= 0, got {o.examples_per_document}")
        check(o.examples_per_document > 0 or bool(o.sentence_end_chars),
               "objective.examples_per_document=0 splits examples into sentences, but "
               "objective.sentence_end_chars is empty")
        cls._validate_model(c)

    @classmethod
    def _validate_model(cls, c: ml_collections.ConfigDict) -> None:
        m, o = c.model, c.objective
        check(m.vocab_size >= 0, f"config field model.vocab_size must be >= 0, got {m.vocab_size}")
        pairs = o.layout in _LABELS
        three_way = o.layout == "sentence_structure"
        check(three_way == (cls.sentence_classes == 3),
               f"objective.layout={o.layout!r} does not fit family {c.family!r}: the three-way "
               "sentence_structure layout is StructBERT's (family 'structbert'), whose sentence "
               "head has 3 classes; the others have 2")
        check(m.nsp_head == pairs,
               f"objective.layout={o.layout!r} needs model.nsp_head={pairs} (the sentence-pair "
               f"head is trained by nsp/sop layouts only); set model.nsp_head={pairs}"
               + ("" if pairs else " and model.pooler=False"))
        check(m.sbo_head == o.span_boundary_objective,
               f"objective.span_boundary_objective={o.span_boundary_objective} needs "
               f"model.sbo_head={o.span_boundary_objective}")
        check(not o.span_boundary_objective or o.layout == "full_sentences",
               "the span-boundary objective trains on single segments: set "
               "objective.layout='full_sentences'")
        check(c.data.inputs_length + m.position_offset <= m.max_position_embeddings,
               f"data.inputs_length={c.data.inputs_length} (+ position_offset "
               f"{m.position_offset}) exceeds model.max_position_embeddings="
               f"{m.max_position_embeddings}")
        check(cls.module_class is not EncoderModel or m.mlm_head,
               "model.mlm_head=False leaves the MLM objective nothing to train")
        EncoderConfig.from_dict({**m.to_dict(), "vocab_size": m.vocab_size or 1})

    @property
    def max_predictions(self) -> int:
        o = self.config.objective
        return o.max_predictions or max(1, math.ceil(o.mlm_rate * self.config.data.inputs_length))

    # ------------------------------------------------------------------ host data
    def _special(self) -> sentence_pairs.SpecialTokens:
        ids = self.ids
        if self.model_config.model_type == "roberta":  # <s> ... </s>
            return sentence_pairs.SpecialTokens(pad=ids.pad, cls=ids.bos, sep=ids.eos,
                                                bos=ids.bos, eos=ids.eos)
        return sentence_pairs.SpecialTokens(pad=ids.pad, cls=ids.cls, sep=ids.sep, bos=ids.cls,
                                            eos=ids.sep)

    def _sentence_ends(self) -> tuple[int, ...]:
        """The ids that end a sentence, when examples are split into sentences."""
        o = self.config.objective
        if o.examples_per_document:
            return ()
        from t5x_like.families.bart import sentence_end_ids

        return tuple(sentence_end_ids(self.vocabulary, o.sentence_end_chars))

    def documents(self, split: str) -> list[list[np.ndarray]]:
        o = self.config.objective
        return task_documents(self.config.data.task, split, self.vocabulary,
                              examples_per_document=o.examples_per_document,
                              sentence_ends=self._sentence_ends())

    def batches(self, *, split: str, batch_size: int, shuffle: bool, repeat: bool,
                skip_batches: int, shard_index: int, num_shards: int
                ) -> Iterator[dict[str, np.ndarray]]:
        """This host's batches of ``objective.layout`` rows (``input_ids``,
        ``token_type_ids``, ``attention_mask`` [B, L], the pair label [B]).

        Rows are always in their seeded order (``shuffle`` has no effect: the pair builder
        draws from a seeded generator either way). ``repeat=False`` gives the whole batches of
        the first epoch of this host's shard, then stops.
        """
        del shuffle
        o = self.config.objective
        if o.layout == "sentence_structure":
            if self.config.data.store:
                raise UserError("objective.layout='sentence_structure' builds its rows from a "
                                "task's documents; it does not read a prepared store: set "
                                "data.store=''")
            return structure_pairs.structure_pair_batches(
                self.documents(split), length=self.config.data.inputs_length,
                batch_size=batch_size, seed=self.config.seed, special=self._special(),
                shard_index=shard_index, num_shards=num_shards, skip_batches=skip_batches,
                short_seq_prob=o.short_seq_prob, repeat=repeat)
        if self.config.data.store:  # by index from the prepared store (data/store_pairs.py)
            from t5x_like.data.store_pairs import store_pair_batches

            stores, _ = self.open_data(split)
            if len(stores) != 1:
                raise UserError(f"{self.config.family} builds {o.layout} rows from one task's "
                                "documents; a mixture's store cannot serve them, name a task")
            d = self.config.data
            return store_pair_batches(
                stores[0], objective=o.layout, length=d.inputs_length,
                global_batch=batch_size * num_shards, seed=self.config.seed,
                special=self._special(), examples_per_document=o.examples_per_document,
                sentence_ends=self._sentence_ends(), eos=self.vocabulary.eos_id,
                short_seq_prob=o.short_seq_prob, repeat=repeat, start_batch=skip_batches,
                process_index=shard_index, process_count=num_shards,
                read_threads=d.read_threads, prefetch_batches=d.prefetch_batches)
        return sentence_pairs.sentence_pair_batches(
            self.documents(split), objective=o.layout, length=self.config.data.inputs_length,
            batch_size=batch_size, seed=self.config.seed, special=self._special(),
            shard_index=shard_index, num_shards=num_shards, skip_batches=skip_batches,
            short_seq_prob=o.short_seq_prob, repeat=repeat)

    # ------------------------------------------------------------------ objective
    def _row_keys(self, tokens: jax.Array, key: jax.Array) -> jax.Array:
        if self.config.objective.static_masking:
            base = jax.random.fold_in(jax.random.key(self.config.seed), STATIC_MASKING_SALT)
            return jax.vmap(lambda h: jax.random.fold_in(base, h))(row_hashes(tokens))
        return jax.random.split(key, tokens.shape[0])

    def masked(self, batch: dict, key: jax.Array, masking: MaskingConfig) -> dict:
        """``masking.mask`` over the rows of ``batch['input_ids']`` (see ``_row_keys``)."""
        tokens = batch["input_ids"]
        keys = self._row_keys(tokens, key)
        row = functools.partial(mask, config=masking)
        if self.word_starts is None:
            return jax.vmap(lambda k, t: row(k, t))(keys, tokens)
        starts = jnp.asarray(self.word_starts)[tokens]
        return jax.vmap(lambda k, t, w: row(k, t, word_starts=w))(keys, tokens, starts)

    def features(self, batch: dict, key: jax.Array) -> dict:
        """Host rows -> masked ``input_ids``, the selected slots (``positions``, ``targets``,
        ``target_weights`` [B, P]), the pair label and ``pair_scale`` (module docstring)."""
        return self._features_from(self.masked(batch, key, self.masking), batch)

    def _features_from(self, out: dict, batch: dict) -> dict:
        """``features`` from the rows' ``mask`` outputs."""
        rows = batch["input_ids"].shape[0]
        f = {
            "input_ids": out["inputs"],
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
            "positions": out["positions"],
            "targets": out["position_targets"],
            "target_weights": out["position_weights"],
        }
        label = _LABELS.get(self.config.objective.layout)
        if label:
            f["sentence_label"] = batch[label]
            f["pair_scale"] = jnp.full((rows,), jnp.sum(out["position_weights"]) / rows)
        if self.masking.span_boundaries:
            offset = jnp.minimum(out["span_offset"], self.model_config.sbo_max_span_length - 1)
            f["span_boundaries"] = jnp.stack([out["span_left"], out["span_right"], offset], -1)
        return f

    # ------------------------------------------------------------------ contract
    def _dropout(self, train: bool) -> bool:
        c = self.model_config
        return train and max(c.hidden_dropout_rate, c.attention_dropout_rate) > 0

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): MLM at the selected slots (+ pair CE, + SBO CE)."""
        out = self.model(params)(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
            masked_positions=batch["positions"], span_boundaries=batch.get("span_boundaries"),
            enable_dropout=self._dropout(train), rngs=nnx.Rngs(dropout=key))
        sums = self._head_sums(out, batch)
        return sums["loss"], sums

    def _head_sums(self, out: dict, batch: dict) -> dict:
        """Metric sums of the MLM logits at the slots, + the pair CE, + the SBO CE."""
        loss = self.config.loss
        sums = losses.cross_entropy_with_z_loss(
            out["mlm_logits"], batch["targets"], batch["target_weights"], z_loss=loss.z_loss,
            label_smoothing=loss.label_smoothing)
        if "sentence_label" in batch:
            name = self.config.objective.layout
            logits, labels = out["nsp_logits"], batch["sentence_label"]
            scaled = losses.cross_entropy_with_z_loss(logits, labels, batch["pair_scale"])
            plain = losses.cross_entropy_with_z_loss(logits, labels, jnp.ones_like(labels))
            sums["loss"] = sums["loss"] + scaled["loss"]
            for metric in ("cross_entropy", "correct", "weight"):
                sums[f"{name}/{metric}"] = plain[metric]
        if "span_boundaries" in batch:
            sbo = losses.cross_entropy_with_z_loss(
                out["sbo_logits"], batch["targets"], batch["target_weights"], z_loss=loss.z_loss,
                label_smoothing=loss.label_smoothing)
            sums["loss"] = sums["loss"] + sbo["loss"]
            for metric in ("cross_entropy", "correct", "weight"):
                sums[f"sbo/{metric}"] = sbo[metric]
        return sums

    def predict_batch(self, params: dict, features: dict, *, max_length: int) -> jax.Array:
        raise UserError(f"a {self.config.family} checkpoint fills masked positions, it does not "
                        "generate text; use t5x-like eval (or export it with export-hf)")


class RobertaFamily(EncoderFamily):
    """RoBERTa: MLM only on FULL-SENTENCES rows (``<s> ... </s>``), positions from 2."""

    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "model_type": "roberta", "position_offset": 2,
                "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
                "pooler": False, "nsp_head": False}

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "layout": "full_sentences"}


class AlbertFamily(EncoderFamily):
    """ALBERT: n-gram MLM (n <= 3 words, p(n) ~ 1/n) + SOP; E = 128, all layers shared."""

    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "model_type": "albert", "embedding_size": 128,
                "layer_sharing": "all", "hidden_act": "gelu_new", "hidden_dropout_rate": 0.0,
                "attention_dropout_rate": 0.0}

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "layout": "sop", "spans": "ngram",
                "max_span_length": 3, "whole_word": True}


class SpanBertFamily(EncoderFamily):
    """SpanBERT: geometric whole-word spans (p 0.2, <= 10), 80/10/10 per span, MLM + SBO on
    single segments, no NSP."""

    @classmethod
    def model_defaults(cls) -> dict:
        return {**super().model_defaults(), "pooler": False, "nsp_head": False,
                "sbo_head": True, "sbo_max_span_length": 32}

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "layout": "full_sentences", "spans": "geometric",
                "max_span_length": 10, "whole_word": True, "replace_per_span": True,
                "span_boundary_objective": True}


class StructBertFamily(EncoderFamily):
    """StructBERT (Wang et al., 2020): BERT's MLM + the word structural objective (K = 3
    unmasked tokens shuffled at 5% of positions, each shuffled position predicts its original
    token through the MLM head; ``objectives/structural.py``) + the sentence structural
    objective (3-way: next / previous / other-document segment; ``data/structure_pairs.py``).

    Loss = MLM mean + word-structure mean + sentence CE mean: the word slots' weights carry
    (MLM weight) / (word weight) of the whole batch, made in ``features`` before any
    micro-batching, as ``pair_scale`` does for the sentence term. Metrics add
    ``word_structure/...`` and ``sentence_structure/...``.
    """

    module_class: ClassVar[type] = StructBertModel
    sentence_classes: ClassVar[int] = 3

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        o = config.objective
        self.word_structure = WordStructure(config.data.inputs_length, o.word_shuffle_rate,
                                            o.word_shuffle_k)

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "layout": "sentence_structure",
                "word_shuffle_rate": 0.05, "word_shuffle_k": 3}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o = c.objective
        WordStructure(c.data.inputs_length, o.word_shuffle_rate, o.word_shuffle_k)

    def features(self, batch: dict, key: jax.Array) -> dict:
        """MLM masking, then the shuffles among the tokens it left alone; ``word_positions``,
        ``word_targets``, ``word_weights`` [B, K x max_ngrams] beside BERT's features."""
        out = self.masked(batch, key, self.masking)
        tokens = batch["input_ids"]
        eligible = ~jnp.isin(tokens, jnp.asarray(self.masking.special_ids))
        available = eligible & (out["weights"] == 0)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, WORD_SHUFFLE_SALT))(
            self._row_keys(tokens, key))
        row = functools.partial(shuffle_ngrams, config=self.word_structure)
        shuffled = jax.vmap(row)(keys, out["inputs"], tokens, available, eligible)
        f = self._features_from({**out, "inputs": shuffled["inputs"]}, batch)
        word = shuffled["position_weights"]
        scale = jnp.sum(out["position_weights"]) / jnp.maximum(jnp.sum(word), 1.0)
        f.update(word_positions=shuffled["positions"], word_targets=shuffled["position_targets"],
                 word_weights=word, word_scale=jnp.full((tokens.shape[0],), scale))
        return f

    def loss_fn(self, params: dict, batch: dict, key: jax.Array, *, train: bool = True):
        """(summed loss, summed metrics): one pass of the MLM head over the MLM slots and the
        shuffled positions, then MLM + word-structure + sentence-structure terms."""
        slots = batch["positions"].shape[1]
        out = self.model(params)(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
            masked_positions=jnp.concatenate([batch["positions"], batch["word_positions"]], 1),
            enable_dropout=self._dropout(train), rngs=nnx.Rngs(dropout=key))
        logits = out["mlm_logits"]
        sums = self._head_sums({**out, "mlm_logits": logits[:, :slots]}, batch)
        word_logits, targets = logits[:, slots:], batch["word_targets"]
        weights = batch["word_weights"]
        scaled = losses.cross_entropy_with_z_loss(
            word_logits, targets, weights * batch["word_scale"][:, None],
            z_loss=self.config.loss.z_loss, label_smoothing=self.config.loss.label_smoothing)
        plain = losses.cross_entropy_with_z_loss(word_logits, targets, weights)
        sums["loss"] = sums["loss"] + scaled["loss"]
        for metric in ("cross_entropy", "correct", "weight"):
            sums[f"word_structure/{metric}"] = plain[metric]
        return sums["loss"], sums


class ErnieFamily(EncoderFamily):
    """ERNIE 1.0 (Sun et al., 2019): BERT (MLM + NSP) whose masking units grow with training:
    basic (whole words), then phrases, then entities of a lexicon (``data/lexicon.py``; the
    default is derived from the corpus), each unit masked whole or not at all.

    Host: ``batches`` adds ``unit_starts`` [B, L]: the vocabulary's word starts with every
    position inside a matched unit of the stage's kinds cleared (longest match, left to
    right), so ``masking.mask`` sees the unit as one "word": it selects whole words only,
    within BERT's 15% budget, and decides 80/10/10 per token. Training batch k (step k + 1) is
    at stage basic before ``objective.phrase_stage_start`` x ``train.num_steps``, phrase
    before ``objective.entity_stage_start`` x ``train.num_steps``, entity after (each stage
    keeps the earlier units); evaluation always masks at the last stage.
    """

    def __init__(self, config: ml_collections.ConfigDict, vocabulary):
        super().__init__(config, vocabulary)
        o = config.objective
        units = lexicon.read_lexicon(o.lexicon or lexicon.DEFAULT_LEXICON)
        self.matcher = lexicon.LexiconMatcher(units, vocabulary.encode, self.word_starts)

    @classmethod
    def objective_defaults(cls) -> dict:
        return {**super().objective_defaults(), "whole_word": True,
                "lexicon": "",  # "" = the default corpus's (data/ernie_shakespeare.tsv)
                "phrase_stage_start": 1 / 3, "entity_stage_start": 2 / 3}

    @classmethod
    def validate_config(cls, c: ml_collections.ConfigDict) -> None:
        super().validate_config(c)
        o = c.objective
        check(o.whole_word, "ERNIE masks whole words, phrases and entities: set "
               "objective.whole_word=True")
        check(o.spans == "single", "ERNIE's units are words, phrases and entities: set "
               "objective.spans='single'")
        check(0.0 <= o.phrase_stage_start <= o.entity_stage_start <= 1.0,
               "objective.phrase_stage_start and entity_stage_start are fractions of "
               f"train.num_steps with 0 <= phrase <= entity <= 1, got {o.phrase_stage_start} "
               f"and {o.entity_stage_start}")

    def stage(self, batch_index: int) -> int:
        """0 basic, 1 phrase, 2 entity: the stage of training batch ``batch_index``."""
        o, steps = self.config.objective, self.config.train.num_steps
        if batch_index < o.phrase_stage_start * steps:
            return 0
        return 1 if batch_index < o.entity_stage_start * steps else 2

    def unit_starts(self, input_ids: np.ndarray, level: int) -> np.ndarray:
        """bool [B, L]: where masking units open at stage ``level`` (``lexicon.unit_starts``)."""
        kinds = np.stack([self.matcher.kinds(row) for row in input_ids])
        return lexicon.unit_starts(self.word_starts[input_ids], kinds, level)

    def batches(self, *, split: str, batch_size: int, shuffle: bool, repeat: bool,
                skip_batches: int, shard_index: int, num_shards: int
                ) -> Iterator[dict[str, np.ndarray]]:
        """BERT's rows plus ``unit_starts`` (class docstring)."""
        stream = super().batches(split=split, batch_size=batch_size, shuffle=shuffle,
                                 repeat=repeat, skip_batches=skip_batches,
                                 shard_index=shard_index, num_shards=num_shards)
        for k, batch in enumerate(stream, start=skip_batches):
            level = self.stage(k) if repeat else 2
            yield {**batch, "unit_starts": self.unit_starts(batch["input_ids"], level)}

    def masked(self, batch: dict, key: jax.Array, masking: MaskingConfig) -> dict:
        tokens = batch["input_ids"]
        keys = self._row_keys(tokens, key)
        row = functools.partial(mask, config=masking)
        return jax.vmap(lambda k, t, w: row(k, t, word_starts=w))(keys, tokens,
                                                                  batch["unit_starts"])
