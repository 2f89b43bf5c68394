"""The demo task and labelled batches: play_lines is built from the corpus with balanced,
correct labels; text-to-text and encoder batches carry the right ids and labels; and a real
run (pretrained checkpoint -> LoRA fine-tuning with the trainer -> eval reload) keeps the
pretrained weights, saves only the LoRA part and reloads it merged."""

from __future__ import annotations

import collections
import json

import jax
import numpy as np

from t5x_like import config as config_lib
from t5x_like import train as train_lib
from t5x_like.checkpoints import Checkpoints
from t5x_like.data import corpus
from t5x_like.data.special_tokens import special_tokens
from t5x_like.evaluation.driver import load_checkpoint
from t5x_like.experiment import build
from t5x_like.finetune import data as ft_data
from t5x_like.finetune.peft import leaves_with_paths
from t5x_like.tasks import play_lines as pl
from t5x_like.tasks.pretraining import default_vocabulary


def test_play_lines_is_balanced_labelled_by_its_play_and_split_cleanly():
    speeches = {}
    for label, file in enumerate(pl.PLAYS.values()):
        text = (corpus._plays_dir() / file).read_text(encoding="utf-8")
        speeches[label] = {s.partition(": ")[2] for s in corpus.parse_play(text)}
    splits = {}
    for split in ("train", "validation"):
        rows = pl.play_lines(split)
        counts = collections.Counter(label for _, label in rows)
        assert sorted(counts) == [0, 1, 2, 3, 4] and len(set(counts.values())) == 1, counts
        for text, label in rows:
            assert text in speeches[label], (text, label)  # from the play it is labelled with
            assert len(text.split()) >= pl.MIN_WORDS
        splits[split] = {t for t, _ in rows}
    assert not splits["train"] & splits["validation"]
    assert len(splits["train"]) > 1000 and len(splits["validation"]) > 150


def test_text_to_text_batches_spell_the_play_words():
    vocab = default_vocabulary()
    words = {tuple(vocab.encode(w) + [1]): i for i, w in enumerate(pl.LABELS)}
    rows = dict(pl.play_lines("validation"))
    batches = ft_data.text_to_text_batches(pl.NAME, split="validation", inputs_length=48,
                                           targets_length=8, batch_size=64, seed=0,
                                           shuffle=False, repeat=False)
    seen = 0
    for batch in batches:
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            ids = tuple(int(t) for t in targets if t)
            if not ids:  # the padding rows of the last, partial batch
                assert inputs[0] == 1 and not inputs[1:].any()
                continue
            text = vocab.decode([int(t) for t in inputs if t > 1])
            assert text.startswith("play: ")
            seen += 1
            speech = text[len("play: "):]
            # truncated to 48 tokens: the decoded prefix belongs to the labelled speech
            matches = [t for t in rows if t.startswith(speech[:40])]
            assert matches and rows[matches[0]] == words[ids]
    assert seen == len(rows)


def test_encoder_rows_classification_and_span_labels():
    vocab = default_vocabulary()
    ids = special_tokens(vocab)
    rows = ft_data.EncoderRows(head="classification", length=16, cls=ids.cls, sep=ids.sep,
                               eos=1, vocabulary=vocab, label_names=pl.LABELS)
    row = rows({"inputs": np.asarray(vocab.encode("play: To be") + [1]),
                "targets": np.asarray(vocab.encode("caesar") + [1])})
    n = len(vocab.encode("play: To be"))
    assert row["input_ids"][0] == ids.cls and row["input_ids"][n + 1] == ids.sep
    assert row["attention_mask"].sum() == n + 2 and int(row["label"]) == 3
    assert rows({"inputs": np.asarray([5, 1]), "targets": np.asarray([7, 1])}) is None
    qa = ft_data.EncoderRows(head="span_qa", length=32, cls=ids.cls, sep=ids.sep, eos=1,
                             vocabulary=vocab, label_names=())
    context = vocab.encode("question: who ? context: the king of denmark is dead")
    answer = vocab.encode("king of denmark")
    row = qa({"inputs": np.asarray(context + [1]), "targets": np.asarray(answer + [1])})
    start, end = int(row["start"]), int(row["end"])
    assert list(row["input_ids"][start:end + 1]) == answer
    assert ft_data.find_span([1, 2, 3, 2, 3], [2, 3]) == 1
    assert ft_data.find_span([1, 2], [3]) == -1


def test_lora_run_from_a_pretrained_checkpoint_saves_only_lora_and_reloads(tmp_path):
    # a "pretrained" T5 run: its initial state written as a checkpoint with its config
    pre = config_lib.base_config("t5")
    pre.model.update(dict(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1,
                          num_decoder_layers=1, scan_layers=False))
    pre.seed = 7
    pre_exp = build(pre)
    pre_dir = tmp_path / "pre"
    pre_exp.write_config(pre_dir)
    state = pre_exp.init_state()
    ckpt = Checkpoints(pre_dir)
    ckpt.save(1, state, {"batches_consumed": 1, "step": 1})
    ckpt.close()
    pretrained = jax.device_get(state["params"])

    c = config_lib.base_config("t5_finetune")
    c.model.update(dict(pre.model.to_dict(), vocab_size=0))
    overrides = {"finetune.mode": "lora", "finetune.init_checkpoint": str(pre_dir),
                 "finetune.lora_rank": 2, "data.task": pl.NAME, "data.inputs_length": 32,
                 "data.batch_size": 8, "train.num_steps": 3, "train.checkpoint_every": 3,
                 "train.eval_every": 3, "train.eval_batches": 1, "train.log_every": 1,
                 "train.progress_bar": False, "optimizer.schedule": "constant",
                 "optimizer.learning_rate": 0.05}
    for key, value in overrides.items():
        config_lib._assign(c, key, value)
    config_lib.validate(c)
    work = tmp_path / "ft"
    result = train_lib.train(c, work)
    assert result["step"] == 3 and "eval/sequence/accuracy" in result
    index = json.loads((work / "checkpoints" / "3" / "state" / "_METADATA").read_text())
    saved = [k for k in index["tree_metadata"] if k.startswith("('params'")]
    assert saved and all(k.startswith("('params', 'peft'") for k in saved)
    exp, params, step = load_checkpoint(work)  # what `t5x-like eval` reads
    assert step == 3
    for path, leaf in leaves_with_paths(params["model"]):  # the pretrained weights, merged
        expected = pretrained
        for k in path:
            expected = expected[k]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
    assert any(np.any(np.asarray(b)) for b in jax.tree.leaves(params["peft"]["b"]))
