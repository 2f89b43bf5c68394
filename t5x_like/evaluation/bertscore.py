"""BERTScore (Zhang et al., 2020) from any encoder checkpoint that ``interop.hf.load`` reads.

Each sentence is tokenised as the checkpoint's tokenizer does it ([CLS] text [SEP]) and
embedded by the encoder; ``layer`` picks the hidden state (0 = embeddings, N = last layer).
Token vectors are L2-normalised, so a dot product is a cosine. Precision matches every
candidate token to its most similar reference token (greedy matching) and averages those
cosines; recall does the same from the reference side; F1 is their harmonic mean.

As in the ``bert-score`` package: [CLS] and [SEP] take part in matching (a token may be
matched to them) but carry weight 0 in the averages; with ``idf`` the other tokens are
weighted by ``log((M + 1) / (df + 1))`` over the M reference sentences (df: how many contain
the token; unseen tokens get ``log(M + 1)``), otherwise by 1. No baseline rescaling.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from t5x_like.errors import UserError


class BertScorer:
    """Holds one encoder checkpoint and scores (candidate, reference) pairs with it."""

    def __init__(self, folder: str | Path, *, layer: int | None = None, batch_size: int = 32,
                 max_length: int = 512, vocabulary=None):
        """``vocabulary``: the tokenizer, when not the folder's own Hugging Face one (any object
        with ``encode``, ``cls_id``, ``sep_id``, ``pad_id``)."""
        from t5x_like.data.hf_vocab import HFTokenizerVocabulary
        from t5x_like.interop import hf

        model, config = hf.load(folder)
        if not hasattr(config, "num_layers") or not callable(model):
            raise UserError(f"{folder} is not an encoder checkpoint BERTScore can read")
        self.num_layers = int(config.num_layers)
        self.layer = self.num_layers if layer is None else layer
        if not 0 <= self.layer <= self.num_layers:
            raise UserError(f"layer must lie in [0, {self.num_layers}] for {folder}, "
                            f"got {self.layer}")
        self.vocab = vocabulary if vocabulary is not None else HFTokenizerVocabulary(folder)
        self.batch_size, self.max_length = batch_size, max_length
        graphdef, params = nnx.split(model, nnx.Param)
        layer_index = self.layer

        def embed(params, ids, mask):
            out = nnx.merge(graphdef, params)(ids, mask, output_hidden_states=True)
            return out["hidden_states"][layer_index]

        self._params, self._embed = params, jax.jit(embed)

    def tokenize(self, text: str) -> list[int]:
        """[CLS] + the text's ids (cut to ``max_length``) + [SEP]."""
        ids = list(self.vocab.encode(text.strip()))[: self.max_length - 2]
        return [self.vocab.cls_id, *ids, self.vocab.sep_id]

    def idf_weights(self, references: Sequence[str]) -> dict[int, float]:
        """{token id: idf} over ``references``; [CLS]/[SEP] get 0."""
        df = Counter(t for ref in references for t in set(self.tokenize(ref)))
        m = len(references)
        idf = {t: math.log((m + 1) / (n + 1)) for t, n in df.items()}
        idf.update({self.vocab.cls_id: 0.0, self.vocab.sep_id: 0.0})
        return idf

    def embed(self, sentences: Sequence[list[int]]) -> list[np.ndarray]:
        """Unit-length token vectors [len, H] of each tokenised sentence, in batches padded to
        a multiple of 16 tokens (few shapes, few compilations)."""
        out = []
        for start in range(0, len(sentences), self.batch_size):
            rows = sentences[start:start + self.batch_size]
            width = -(-max(len(r) for r in rows) // 16) * 16
            ids = np.full((self.batch_size, width), self.vocab.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = r, 1
            hidden = np.asarray(self._embed(self._params, ids, mask), np.float64)
            for i, r in enumerate(rows):
                h = hidden[i, :len(r)]
                out.append(h / np.linalg.norm(h, axis=-1, keepdims=True))
        return out

    def score(self, candidates: Sequence[str], references: Sequence[str], *,
              idf: bool = False) -> dict[str, np.ndarray]:
        """{"precision", "recall", "f1"}: one value per pair, as arrays."""
        if len(candidates) != len(references) or not candidates:
            raise UserError(f"BERTScore needs one reference per candidate, got "
                            f"{len(candidates)} candidates and {len(references)} references")
        cand_ids = [self.tokenize(c) for c in candidates]
        ref_ids = [self.tokenize(r) for r in references]
        specials = {self.vocab.cls_id: 0.0, self.vocab.sep_id: 0.0}
        unseen = math.log(len(references) + 1) if idf else 1.0
        weights = self.idf_weights(references) if idf else specials
        vectors = self.embed(cand_ids + ref_ids)
        cand_vecs, ref_vecs = vectors[: len(candidates)], vectors[len(candidates):]
        p, r = np.zeros(len(candidates)), np.zeros(len(candidates))
        for i, (c, ref) in enumerate(zip(cand_ids, ref_ids, strict=True)):
            sim = cand_vecs[i] @ ref_vecs[i].T  # [len(c), len(ref)] cosines
            wc = np.array([weights.get(t, unseen) for t in c])
            wr = np.array([weights.get(t, unseen) for t in ref])
            p[i] = (sim.max(axis=1) * wc).sum() / max(wc.sum(), 1e-12)  # 0 for an empty text
            r[i] = (sim.max(axis=0) * wr).sum() / max(wr.sum(), 1e-12)
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
        return {"precision": p, "recall": r, "f1": f}


def bert_score(candidates: Sequence[str], references: Sequence[str], folder: str | Path, *,
               layer: int | None = None, idf: bool = False) -> dict[str, float]:
    """Mean BERTScore P/R/F1 of the pairs with the encoder in ``folder`` (a transformers
    folder of a BERT-family model); ``layer`` defaults to the last."""
    scores = BertScorer(folder, layer=layer).score(candidates, references, idf=idf)
    return {f"bertscore_{k}": float(v.mean()) for k, v in scores.items()}
