"""Evaluate and use a trained checkpoint: validation metrics, a unigram baseline, filled spans."""

from __future__ import annotations

import inspect
from pathlib import Path

import jax
import numpy as np

from t5x_like import config as config_lib
from t5x_like import decoding, storage
from t5x_like.checkpoints import Checkpoints
from t5x_like.distributed import host_array
from t5x_like.errors import UserError
from t5x_like.evaluation import loop as eval_loop
from t5x_like.experiment import Experiment, build


def load_checkpoint(workdir: str | Path, overrides=()) -> tuple[Experiment, dict, int]:
    """(experiment, params, step) from a workdir's resolved config and newest readable step."""
    workdir = storage.as_path(workdir)  # a local folder or gs://
    config = config_lib.config_from_json(workdir / "config.json")
    config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    exp = build(config)
    checkpoints = Checkpoints(workdir, read_only=True)
    # merges a fine-tuning run's saved part back; evaluation starts its own carry
    restored = exp.restore(checkpoints, carry=False)
    checkpoints.close()
    if restored is None:
        raise UserError(f"{workdir} has no readable checkpoint; train first with t5x-like train")
    state, _ = restored
    return exp, state["params"], int(jax.device_get(state["step"]))


def unigram_baseline(exp: Experiment, *, train_batches: int = 32, eval_batches: int) -> float:
    """Cross-entropy of a model that knows only target-token frequencies.

    Frequencies come from corrupted *training* batches (so sentinels and EOS are counted like
    any target token), add-one smoothed; the loss is taken on the same validation targets the
    model is scored on. A trained model must beat it to have learned anything from context.
    """
    features = jax.jit(exp.family.features)
    vocab = exp.config.model.vocab_size
    counts = np.ones(vocab, np.float64)
    stream = eval_loop.device_batches(exp, split="train", repeat=True, shuffle=False)
    for i in range(train_batches):
        targets = _scored_targets(features(next(stream), jax.random.key(i)))
        counts += np.bincount(targets, minlength=vocab)[:vocab]
    log_p = np.log(counts / counts.sum())
    key = jax.random.fold_in(exp.root_key, eval_loop.EVAL_KEY_SALT)
    total, n = 0.0, 0
    split = exp.config.data.eval_split
    stream = eval_loop.device_batches(exp, split=split, repeat=False, shuffle=False)
    for i, batch in enumerate(stream):
        if eval_batches and i >= eval_batches:
            break
        scored = _scored_targets(features(batch, jax.random.fold_in(key, i)))
        total -= log_p[scored].sum()
        n += scored.size
    return total / max(n, 1)


def _scored_targets(features: dict) -> np.ndarray:
    """The target ids a family scores: where ``target_weights`` (if it has them) is non-zero,
    else the non-padding targets."""
    targets = host_array(features["targets"])
    weights = features.get("target_weights")
    return targets[host_array(weights) > 0 if weights is not None else targets > 0]


def token_stream(exp: Experiment, *, split: str, chunk: int, max_chunks: int = 0) -> np.ndarray:
    """The split's token stream in document order (EOS between documents), read as chunks of
    ``chunk`` tokens (the incomplete last one is dropped); ``max_chunks`` > 0 stops early."""
    from t5x_like.data.pipeline import raw_token_batches

    chunks = []
    for batch in raw_token_batches(exp.config.data.task, split=split, raw_length=chunk,
                                   batch_size=1, seed=exp.config.seed, shuffle=False,
                                   repeat=False, vocabulary=exp.vocabulary):
        chunks.append(batch["tokens"][0])
        if max_chunks and len(chunks) >= max_chunks:
            break
    return np.concatenate(chunks)


def perplexity(exp: Experiment, params: dict, *, window: int | None = None,
               stride: int | None = None, num_batches: int = 0) -> dict:
    """Sliding-window perplexity of the eval split (families with ``perplexity_window``).

    ``window`` defaults to the family's (one training chunk), ``stride`` to ``window`` (the
    naive chunked number). ``num_batches`` > 0 reads only the first ``num_batches *
    batch_size`` windows' worth of the stream, ``window`` tokens each.
    """
    from t5x_like.evaluation.perplexity import sliding_window_perplexity

    window = window or exp.family.perplexity_window
    stride = stride or window
    batch_size = exp.config.data.batch_size
    stream = token_stream(exp, split=exp.config.data.eval_split, chunk=window,
                          max_chunks=num_batches * batch_size)
    score = jax.jit(exp.family.score_batch)

    def total(tokens: np.ndarray, weights: np.ndarray) -> float:
        return float(np.sum(host_array(score(params, {"tokens": tokens, "weights": weights}))))

    result = sliding_window_perplexity(stream, total, window=window, stride=stride,
                                       batch_size=batch_size)
    return {"perplexity": result["perplexity"], "perplexity_nll": result["nll"],
            "perplexity_tokens": result["tokens"], "window": window, "stride": stride}


def evaluate_checkpoint(
    workdir: str | Path,
    *,
    overrides=(),
    num_batches: int | None = None,
    baseline: bool = True,
    window: int | None = None,
    stride: int | None = None,
) -> dict:
    """Validation metrics of the newest checkpoint, beside the unigram baseline; families that
    score token streams (``perplexity_window``) add sliding-window perplexity, token
    classification heads span-level precision / recall / F1 (``tagging``)."""
    exp, params, step = load_checkpoint(workdir, overrides)
    streams = getattr(exp.family, "perplexity_window", None)
    if (window or stride) and not streams:
        raise UserError(f"--window/--stride need a family that scores token streams (gpt); "
                        f"this checkpoint is {exp.config.family!r}")
    num_batches = exp.config.train.eval_batches if num_batches is None else num_batches
    scores = eval_loop.evaluate(exp, params, num_batches=num_batches)
    report = {
        "step": step,
        "task": exp.config.data.task,
        "split": exp.config.data.eval_split,
        **scores,
    }
    if baseline:
        report["unigram_loss"] = unigram_baseline(exp, eval_batches=num_batches)
    if streams:
        report.update(perplexity(exp, params, window=window, stride=stride,
                                 num_batches=num_batches))
    if "finetune" in exp.config and exp.config.finetune.head == "token_classification":
        from t5x_like.evaluation.tagging import evaluate_spans  # NER: seqeval's span F1

        report.update(evaluate_spans(exp, params, num_batches=num_batches))
    return report


def _is_sentinel(vocab, token: int) -> bool:
    return token >= vocab.vocab_size - vocab.extra_ids


def _span_pieces(tokens: np.ndarray, vocab) -> dict[int, list[int]]:
    """Target tokens grouped by sentinel index: ``{0: [...], 1: [...]}``; padding ends it.
    A sentinel the model repeats keeps its first span (what follows a repeat is dropped), as
    the candidates of ``fill_spans`` are read after its first occurrence."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in _strip_final_eos(tokens.tolist()):
        if _is_sentinel(vocab, t):
            index = vocab.vocab_size - 1 - t
            current = None if index in spans else index
            if current is not None:
                spans[current] = []
        elif current is not None:
            spans[current].append(t)
    return spans


def _strip_final_eos(ids: list[int]) -> list[int]:
    """Ids before padding, without the EOS the objective appends (EOS inside a chunk marks a
    document boundary in the packed stream and is kept)."""
    ids = ids[: ids.index(0)] if 0 in ids else ids
    return ids[:-1] if ids and ids[-1] == 1 else ids


def fill_spans(
    exp: Experiment, params: dict, *, num_examples: int = 5, length: int = 48, seed: int = 1,
    top_k: int = 3,
) -> list[dict]:
    """Held-out text with spans masked, the model's greedy fills and the truth, as text (and
    ids); per span, the model's ``top_k`` likeliest first tokens with their probabilities.

    Uses the first rows of the validation split, cut to ``length`` tokens so a line fits on
    screen; the spans come from the same span corruption the model was trained with. The
    candidates are read where greedy decoding chose the span's first token (after its
    sentinel in the greedy output), so the first candidate is the fill's first token: what
    the model knows shows even when greedy decoding picks ``,``.
    """
    if exp.config.family != "t5":
        raise UserError(f"--samples shows T5 span corruption filled in; this checkpoint is "
                        f"{exp.config.family!r}, whose metrics eval prints without it")
    vocab = exp.vocabulary
    batch = next(
        eval_loop.device_batches(exp, split=exp.config.data.eval_split, repeat=False, shuffle=False)
    )
    raw = host_array(batch["tokens"])[:num_examples, :length]
    features = exp.family.features({"tokens": raw}, jax.random.key(seed))
    predicted = host_array(
        exp.family.predict_batch(
            params, {"inputs": features["inputs"]}, max_length=features["targets"].shape[1] + 8
        )
    )
    probs = _next_token_probs(exp, params, np.asarray(features["inputs"]), predicted)
    samples = []
    for inputs, truth, guess, p in zip(
        np.asarray(features["inputs"]), np.asarray(features["targets"]), predicted, probs,
        strict=True,
    ):
        segments = _segments(vocab, inputs.tolist())
        true_spans, guess_spans = _span_pieces(truth, vocab), _span_pieces(guess, vocab)
        samples.append(
            {
                "masked": _render(segments, lambda i: f"<{i}>"),
                "model": _render(
                    segments, lambda i, g=guess_spans: f"[{vocab.decode(g.get(i, []))}]"
                ),
                "truth": _render(
                    segments, lambda i, t=true_spans: f"[{vocab.decode(t.get(i, []))}]"
                ),
                "candidates": _first_token_candidates(vocab, guess, p, top_k),
                # the token ids behind the text: masked inputs, true targets, greedy output
                "input_ids": inputs.tolist(),
                "target_ids": truth.tolist(),
                "output_ids": guess.tolist(),
            }
        )
    return samples


def _next_token_probs(exp: Experiment, params: dict, inputs: np.ndarray,
                      outputs: np.ndarray) -> np.ndarray:
    """[B, T, V] probabilities of each output position's token given the outputs before it
    (teacher forcing on the model's own greedy output)."""
    from t5x_like.families.t5 import shift_right

    logits = exp.family.model(params)(inputs, shift_right(outputs))
    return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))


def _first_token_candidates(vocab, output: np.ndarray, probs: np.ndarray,
                            top_k: int) -> dict[int, list[tuple[str, float]]]:
    """``{span index: [(piece, probability), ...]}``: the ``top_k`` likeliest tokens at the
    position after each sentinel of ``output`` (its first occurrence), likeliest first."""
    out: dict[int, list[tuple[str, float]]] = {}
    ids = _strip_final_eos(output.tolist())
    for position, token in enumerate(ids):
        if not _is_sentinel(vocab, token) or position + 1 >= len(output):
            continue
        span = vocab.vocab_size - 1 - token
        if span in out:
            continue
        row = probs[position + 1]
        best = np.argsort(-row[: vocab.vocab_size], kind="stable")[:top_k]  # not table padding
        out[span] = [(_piece(vocab, int(t)), float(row[t])) for t in best]
    return out


def _piece(vocab, token: int) -> str:
    """A token as a user reads it: EOS, a sentinel, or its text (a word-initial piece's
    space kept visible as ``_``)."""
    if token == 1:
        return "</s>"
    if _is_sentinel(vocab, token):
        return f"<{vocab.vocab_size - 1 - token}>"
    piece = vocab.tokenizer.id_to_piece(token) if hasattr(vocab, "tokenizer") else None
    return piece.replace("\u2581", "_") if piece else vocab.decode([token])


def _segments(vocab, ids: list[int]) -> list[str | int]:
    """Ids as decoded text runs and sentinel indices: ``['text', 0, 'text', 1]``.

    A document boundary (EOS inside the packed chunk) is shown as ``|``.
    """
    out: list[str | int] = []
    run: list[int] = []
    for t in [*_strip_final_eos(ids), None]:
        if t is None or t == 1 or _is_sentinel(vocab, t):
            if run:
                out.append(vocab.decode(run))
                run = []
            if t == 1:
                out.append("|")
            elif t is not None:
                out.append(vocab.vocab_size - 1 - t)
        else:
            run.append(t)
    return out


def _render(segments: list[str | int], fill) -> str:
    return " ".join(fill(s) if isinstance(s, int) else s for s in segments)


def infer(workdir: str | Path, texts: list[str], *, max_length: int = 64,
          options: decoding.Options | None = None, seed: int = 0) -> list[str]:
    """Decoding of each text (e.g. with ``<extra_id_0>`` sentinels) by a checkpoint: greedy,
    or beam search / sampling by ``options`` (the best beam; draws from ``seed``)."""
    exp, params, _ = load_checkpoint(workdir)
    extra = {}
    if options is not None and options != decoding.Options():
        if "options" not in inspect.signature(exp.family.predict_batch).parameters:
            raise UserError(f"a {exp.config.family} checkpoint decodes greedily only; drop "
                            "--beam-size/--alpha/--temperature/--top-k/--top-p")
        if options.num_return_sequences != 1:
            raise UserError("infer prints one output per input; use num_return_sequences=1")
        extra = {"options": options, "key": jax.random.key(seed)}
    vocab = exp.vocabulary
    # A family in a Hugging Face tokenizer's layout (BART) reads <s> text </s>, padded with the
    # tokenizer's pad, as tokenizer(text) gives; ours read text EOS, padded with 0.
    hf_layout = getattr(exp.family, "hf_layout", False)
    eos, pad = (vocab.eos_id, vocab.pad_id) if hf_layout else (1, 0)
    encoded = [([vocab.bos_id] if hf_layout else []) + vocab.encode(t) + [eos] for t in texts]
    width = max(len(e) for e in encoded)
    inputs = np.full((len(encoded), width), pad, np.int32)
    for row, ids in zip(inputs, encoded, strict=True):
        row[: len(ids)] = ids
    out = np.asarray(exp.family.predict_batch(params, {"inputs": inputs}, max_length=max_length,
                                              **extra))
    results = []
    for row in out:
        ids = row.tolist()
        ids = ids[: ids.index(eos)] if eos in ids else ids  # decoding stops at the first EOS
        results.append(vocab.decode(ids) if hf_layout else _decode_with_sentinels(vocab, ids))
    return results


def _decode_with_sentinels(vocab, ids: list[int]) -> str:
    """Text with sentinel ids written as ``<extra_id_N>`` (as T5 prints them)."""
    return _render(_segments(vocab, ids), lambda i: f"<extra_id_{i}>")
