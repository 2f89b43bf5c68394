"""Scoring (reference, prediction) pairs with a learned metric beside BLEU, ROUGE and BERTScore.

A learned metric is a ``bert_finetune`` run with a regression head trained on
``[CLS] reference [SEP] candidate [SEP]`` (``configs/learned_metric.py``); its prediction for a
pair is its score. ``t5x-like eval --metric SPEC`` takes any of:

- ``learned:WORKDIR``: that run's regression output per pair (the scale it was trained on:
  0..1 for the shipped presets);
- ``bleu``: sacrebleu's sentence BLEU per pair (0..100), and corpus BLEU over the file;
- ``rouge``: rouge-score's ROUGE-L F-measure per pair (0..1, no stemmer);
- ``bertscore:HF_FOLDER``: BERTScore F1 per pair with that encoder (``bertscore.py``).

With ``--references/--predictions`` (one text a line) it prints a score per prediction and
the means; with ``--ratings FILE.tsv`` (``data.metric_pairs.read_ratings``) it prints each
metric's Pearson and Kendall correlation (scipy) with the human scores of one split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from t5x_like.data import metric_pairs
from t5x_like.errors import UserError

if TYPE_CHECKING:
    import seqio

KINDS = ("learned", "bleu", "rouge", "bertscore")


class LearnedMetric:
    """A trained regression run that scores (reference, candidate) pairs."""

    def __init__(self, workdir: str | Path):
        from t5x_like import config as config_lib
        from t5x_like import storage
        from t5x_like.data.special_tokens import special_tokens
        from t5x_like.evaluation.driver import load_checkpoint

        config_file = storage.as_path(workdir) / "config.json"
        if not config_file.exists():
            raise UserError(f"--metric learned:{workdir}: {config_file} does not exist; train "
                            "one with configs/learned_metric.py")
        saved = config_lib.config_from_json(config_file)
        # A fully fine-tuned run saves every weight: its init_checkpoint (and that run's) need
        # not be read again, nor exist any more.
        full = "finetune" in saved and saved.finetune.mode == "full"
        self.exp, self.params, self.step = load_checkpoint(
            workdir, ["finetune.init_checkpoint="] if full else [])
        c = self.exp.config
        if c.family != "bert_finetune" or c.finetune.head != "regression":
            raise UserError(f"--metric learned:{workdir} needs a run with a regression head "
                            f"(configs/learned_metric.py); it is a {c.family!r} run"
                            + (f" with finetune.head={c.finetune.head!r}"
                               if "finetune" in c else ""))
        ids = special_tokens(self.exp.vocabulary)
        roberta = self.exp.family.model_config.model_type == "roberta"
        self.cls, self.sep = (ids.bos, ids.eos) if roberta else (ids.cls, ids.sep)
        self.length = c.data.inputs_length
        self.batch_size = c.data.batch_size
        self._predict = jax.jit(self.exp.family.predict_batch)

    def row(self, reference: str, candidate: str) -> list[int]:
        return pair_row(self.exp.vocabulary, reference, candidate, length=self.length,
                        cls=self.cls, sep=self.sep)

    def score(self, references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """One score per pair, float64 [N]."""
        _check_pairs(references, candidates)
        rows = [self.row(r, c) for r, c in zip(references, candidates, strict=True)]
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids = np.zeros((self.batch_size, self.length), np.int32)
            mask = np.zeros((self.batch_size, self.length), np.int32)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = r, 1
            ids[len(chunk):, :2], mask[len(chunk):, :2] = (self.cls, self.sep), 1  # filler rows
            batch = {"input_ids": ids, "attention_mask": mask}
            out.append(np.asarray(self._predict(self.params, batch))[:len(chunk)])
        return np.concatenate(out).astype(np.float64)


def pair_row(vocabulary: seqio.Vocabulary, reference: str, candidate: str, *, length: int,
             cls: int, sep: int) -> list[int]:
    """``[CLS] reference [SEP] candidate [SEP]`` ids, each side cut as the training tasks cut
    it (``tasks.ratings.pair_inputs``)."""
    first, second = metric_pairs.pair_lengths(length)
    return [cls, *vocabulary.encode(reference)[:first], sep,
            *vocabulary.encode(candidate)[:second], sep]


class _SentencePieceSpecials:
    """Our SentencePiece vocabulary with the [CLS]/[SEP]/padding ids our encoders use
    (``data.special_tokens``), in the shape ``bertscore.BertScorer`` reads."""

    def __init__(self, path: Path):
        from t5x_like.data.special_tokens import special_tokens
        from t5x_like.data.vocab import get_vocabulary

        self.vocabulary = get_vocabulary(str(path))
        ids = special_tokens(self.vocabulary)
        self.cls_id, self.sep_id, self.pad_id = ids.cls, ids.sep, ids.pad

    def encode(self, text: str) -> list[int]:
        return list(self.vocabulary.encode(text))


def _our_vocabulary(folder: str) -> _SentencePieceSpecials | None:
    """For a folder ``t5x-like export-hf`` wrote from a SentencePiece model (``spiece.model``,
    no Hugging Face tokenizer files): that vocabulary; else None (the folder's tokenizer)."""
    from t5x_like.interop.checkpoint_io import HF_TOKENIZER_FILES, HF_VOCAB_FILE

    path = Path(folder)
    if (path / HF_VOCAB_FILE).is_file() and not any((path / n).is_file()
                                                    for n in HF_TOKENIZER_FILES):
        return _SentencePieceSpecials(path / HF_VOCAB_FILE)
    return None


def _check_pairs(references: Sequence[str], candidates: Sequence[str]) -> None:
    if len(references) != len(candidates) or not references:
        raise UserError(f"metrics need one reference per prediction, got {len(references)} "
                        f"references and {len(candidates)} predictions")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"learned:runs/m"`` -> ("learned", "runs/m"); ``"bleu"`` -> ("bleu", "")."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise UserError(f"--metric {spec!r}: the kind must be one of {', '.join(KINDS)} "
                        "(learned:WORKDIR, bleu, rouge, bertscore:HF_FOLDER)")
    if kind in ("learned", "bertscore") and not arg:
        raise UserError(f"--metric {kind} needs a folder: {kind}:"
                        f"{'WORKDIR' if kind == 'learned' else 'HF_FOLDER'}")
    if kind in ("bleu", "rouge") and arg:
        raise UserError(f"--metric {kind} takes no argument, got {spec!r}")
    return kind, arg


def check_specs(specs: Sequence[str]) -> None:
    """Every spelling checked (``parse_spec``) before anything loads; at least one metric."""
    if not specs:
        raise UserError("name at least one metric: --metric learned:WORKDIR, bleu, rouge or "
                        "bertscore:HF_FOLDER")
    for spec in specs:
        parse_spec(spec)


def per_pair(spec: str, references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """The metric ``spec``'s score of each (reference, candidate) pair."""
    kind, arg = parse_spec(spec)
    _check_pairs(references, candidates)
    if kind == "learned":
        return LearnedMetric(arg).score(references, candidates)
    if kind == "bertscore":
        from t5x_like.evaluation.bertscore import BertScorer

        return BertScorer(arg, vocabulary=_our_vocabulary(arg)).score(
            list(candidates), list(references))["f1"]
    pairs = zip(references, candidates, strict=True)
    if kind == "bleu":
        return np.array([metric_pairs.sentence_bleu(r, c) for r, c in pairs])
    return np.array([metric_pairs.rouge_fmeasures(r, c, ("rougeL",))["rougeL"] for r, c in pairs])


def score_texts(specs: Sequence[str], references: Sequence[str],
                candidates: Sequence[str]) -> dict:
    """{"per_pair": {spec: [N] scores}, "mean": {spec: mean}, "corpus_bleu": (with bleu)}."""
    check_specs(specs)
    scores = {spec: per_pair(spec, references, candidates) for spec in specs}
    report = {"per_pair": {k: v.tolist() for k, v in scores.items()},
              "mean": {k: float(np.mean(v)) for k, v in scores.items()}}
    if any(parse_spec(s)[0] == "bleu" for s in specs):
        from t5x_like.evaluation.metrics import bleu

        report["corpus_bleu"] = bleu(list(references), list(candidates))["bleu"]
    return report


def correlations(human: Sequence[float], scores: Sequence[float]) -> dict[str, float]:
    """Pearson's r and Kendall's tau (tau-b) of ``scores`` with ``human``, from scipy; both NaN
    where the metric gives every pair one score (a correlation is not defined)."""
    from scipy import stats

    human, scores = np.asarray(human, np.float64), np.asarray(scores, np.float64)
    if len(human) != len(scores) or len(human) < 2:
        raise UserError(f"correlations need at least 2 paired values, got {len(human)} human "
                        f"scores and {len(scores)} metric scores")
    if np.ptp(human) == 0:
        raise UserError(f"the {len(human)} human scores are all {human[0]:g}; a correlation "
                        "needs ratings that vary")
    if np.ptp(scores) == 0:
        return {"pearson": float("nan"), "kendall": float("nan")}
    return {"pearson": float(stats.pearsonr(human, scores)[0]),
            "kendall": float(stats.kendalltau(human, scores)[0])}


def score_ratings(specs: Sequence[str], path: str | Path, split: str) -> dict:
    """Each metric's correlation with the human scores of ``split`` of a ratings TSV."""
    check_specs(specs)
    rows = metric_pairs.read_ratings(path)
    if split not in rows:
        raise UserError(f"{path} has no split {split!r}; it has {', '.join(sorted(rows))}")
    pairs = rows[split]
    references = [p.reference for p in pairs]
    candidates = [p.candidate for p in pairs]
    human = [p.score for p in pairs]
    return {"ratings": str(path), "split": split, "pairs": len(pairs),
            "correlations": {spec: correlations(human, per_pair(spec, references, candidates))
                             for spec in specs}}


def format_texts(report: dict, specs: Sequence[str]) -> str:
    """A score per prediction (one row each), then the means (and corpus BLEU)."""
    kinds = [parse_spec(s)[0] for s in specs]
    labels = [k if kinds.count(k) == 1 else f"{k}:{Path(parse_spec(s)[1]).name}"
              for k, s in zip(kinds, specs, strict=True)]
    lines = ["#     " + "  ".join(f"{label:>14.14}" for label in labels)]
    columns = [report["per_pair"][s] for s in specs]
    for i, values in enumerate(zip(*columns, strict=True)):
        lines.append(f"{i:<5} " + "  ".join(f"{v:>14.4f}" for v in values))
    lines.append("mean  " + "  ".join(f"{report['mean'][s]:>14.4f}" for s in specs))
    if "corpus_bleu" in report:
        lines.append(f"corpus BLEU {report['corpus_bleu']:.2f}")
    return "\n".join(lines)


def format_ratings(report: dict) -> str:
    """One line per metric: Pearson and Kendall with the human scores."""
    lines = [f"{report['pairs']} pairs of {report['ratings']} ({report['split']}): "
             "correlation with the human scores"]
    for spec, c in report["correlations"].items():
        lines.append(f"  {spec:<40} pearson {c['pearson']:+.4f}   kendall {c['kendall']:+.4f}")
    return "\n".join(lines)


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, one reference or prediction a line (``\\n`` or
    ``\\r\\n`` line ends; a blank line is an empty text); a missing, empty or non-UTF-8 file
    stops with one sentence."""
    text = metric_pairs.read_utf8(path, "text file")
    if not text.strip():
        raise UserError(f"text file {path} is empty; give one text a line")
    return [line.removesuffix("\r") for line in text.rstrip("\n").split("\n")]
