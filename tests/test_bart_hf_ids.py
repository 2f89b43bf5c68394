"""An imported ``facebook/bart``-layout checkpoint (pad 1, <s> 0, </s> 2, decoder start 2, <mask>
last, its byte-level BPE tokenizer beside it) trains further with its own ids, checked against
transformers' BartForConditionalGeneration (the oracle): loss, logits and decoder inputs on
one batch of our data path; import-hf -> train -> eval -> export-hf through the CLI, with the
exported model's ``generate`` equal to our greedy decode token for token."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow models for nothing

import dataclasses
import json

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from tokenizers import processors
from transformers.models.bart.modeling_bart import shift_tokens_right

from t5x_like import cli
from t5x_like import config as config_lib
from t5x_like.data import corpus
from t5x_like.data.vocab import get_vocabulary
from t5x_like.errors import UserError
from t5x_like.evaluation.driver import load_checkpoint
from t5x_like.experiment import build
from t5x_like.interop import hf
from t5x_like.tasks import register_text_task

BOS, PAD, EOS, START = 0, 1, 2, 2
INPUTS_LENGTH, BATCH = 24, 4
HF_SMALL = dict(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
                max_position_embeddings=64, dropout=0.0)


def _tokenizer(texts: list[str]) -> transformers.BartTokenizerFast:
    """A small byte-level BPE in BART's layout: <s> <pad> </s> <unk> first, <mask> appended
    after the merges (facebook/bart's 50264 is its last id), <s> ... </s> added by the
    tokenizer as RoBERTa's post-processor does."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tok = bpe._tokenizer
    tok.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", EOS), ("<s>", BOS),
                                                      add_prefix_space=False)
    return transformers.BartTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


@pytest.fixture(scope="module")
def hf_bart(tmp_path_factory):
    """(folder, model, tokenizer, corpus file): a random BART (noise on every parameter and on
    final_logits_bias) saved as safetensors with its tokenizer, and a text file of speeches."""
    texts = corpus.default_corpus_texts("train")[:1500]
    tokenizer = _tokenizer(texts)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.mask_token_id) == (BOS, PAD, EOS, len(tokenizer) - 1)
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=len(tokenizer), pad_token_id=PAD,
                                     bos_token_id=BOS, eos_token_id=EOS,
                                     decoder_start_token_id=START, **HF_SMALL)
    model = transformers.BartForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*model.parameters(), model.final_logits_bias]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("hf_bart")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    text_file = folder.parent / "speeches.txt"  # validation: the corpus's own held-out lines
    held_out = corpus.default_corpus_texts("validation")[:100]
    text_file.write_text("\n".join(texts[:600] + held_out) + "\n")
    return folder, model.eval(), tokenizer, text_file


def _task_module(path, name: str, text_file, vocab_folder) -> str:
    """A data.task_modules file registering ``name``: the text file tokenised with the
    imported checkpoint's tokenizer (the vocabulary data.vocab_path names)."""
    path.write_text(
        "from t5x_like.data.vocab import get_vocabulary\n"
        "from t5x_like.tasks import register_text_task\n"
        f"register_text_task({name!r}, {str(text_file)!r},\n"
        f"                   vocabulary=get_vocabulary({str(vocab_folder)!r}))\n")
    return str(path)


def test_loss_logits_and_decoder_inputs_match_transformers(hf_bart, tmp_path):
    """The ids come from the checkpoint (config.json + tokenizer); on one batch of our data
    path, rows are <s> ... </s>, noise uses the tokenizer's <mask>, decoder inputs are
    transformers' shift_tokens_right, and loss and logits equal BartForConditionalGeneration's
    with labels (HF ignores -100: here a padded copy of the batch checks it)."""
    folder, reference, tokenizer, text_file = hf_bart
    model, model_config = hf.load(folder)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config = config_lib.base_config("bart")
    config.model.update(dataclasses.asdict(model_config))
    task = "bart_hf_ids_parity"
    register_text_task(task, str(text_file), vocabulary=get_vocabulary(str(folder)))
    config_lib.apply_overrides(config, [f"data.vocab_path={folder}", f"data.task={task}",
                                        f"data.inputs_length={INPUTS_LENGTH}", "loss.z_loss=0.0"])
    config_lib.validate(config)
    family = build(config).family
    assert family.hf_layout and family.raw_length == INPUTS_LENGTH - 2
    ids = family.token_ids
    assert (ids.bos, ids.pad, ids.eos, ids.mask) == (BOS, PAD, EOS, tokenizer.mask_token_id)

    batch = next(family.batches(split="validation", batch_size=BATCH, shuffle=False,
                                repeat=False, skip_batches=0, shard_index=0, num_shards=1))
    features = jax.device_get(jax.jit(family.features)(batch, jax.random.key(3)))
    inputs, targets = features["inputs"], features["targets"]
    np.testing.assert_array_equal(targets[:, 1:-1], batch["tokens"])
    assert (targets[:, 0] == BOS).all() and (targets[:, -1] == EOS).all()
    assert (inputs[:, 0] == BOS).all() and (inputs == ids.mask).any() and (inputs == PAD).any()
    hf_decoder = shift_tokens_right(torch.tensor(targets, dtype=torch.long), PAD, START)
    np.testing.assert_array_equal(features["decoder_inputs"], hf_decoder.numpy())

    # A second copy with the last 7 targets of two rows padded: their labels are -100 for HF.
    padded = {k: np.array(v) for k, v in features.items()}
    padded["targets"][:2, -7:] = PAD
    padded["target_weights"] = (padded["targets"] != PAD).astype(np.float32)
    padded["decoder_inputs"] = np.asarray(
        shift_tokens_right(torch.tensor(padded["targets"], dtype=torch.long), PAD, START))
    ours = jax.jit(lambda p, f: (family.loss_fn(p, f, None, train=False),
                                 family._logits(p, f, train=False, key=None)))
    for f in (features, padded):
        labels = torch.tensor(f["targets"], dtype=torch.long)
        labels[labels == PAD] = -100
        enc = torch.tensor(f["inputs"], dtype=torch.long)
        with torch.no_grad():
            out = reference(input_ids=enc, attention_mask=enc != PAD, labels=labels)
        (loss_sum, sums), logits = jax.device_get(ours(params, f))
        assert sums["weight"] == (labels != -100).sum().item()
        np.testing.assert_allclose(loss_sum / sums["weight"], out.loss.item(), rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_import_train_eval_export_generates_as_transformers(hf_bart, tmp_path, capsys):
    """The real CLI: import-hf, a few train steps from the imported checkpoint (the loss falls),
    eval, export-hf; transformers loads the export and its greedy ``generate`` equals ours."""
    folder, _, tokenizer, text_file = hf_bart
    workdir, out = tmp_path / "run", tmp_path / "exported"
    task = "bart_hf_ids_cli"
    module = _task_module(tmp_path / "bart_cli_tasks.py", task, text_file, workdir)
    assert cli.main(["import-hf", str(folder), str(workdir), f"--config.data.task_modules={module}",
                     f"--config.data.task={task}", f"--config.data.inputs_length={INPUTS_LENGTH}",
                     f"--config.data.batch_size={BATCH}"]) == 0
    saved = json.loads((workdir / "config.json").read_text())  # the ids of the checkpoint
    assert saved["data"]["vocab_path"] == str(workdir)
    assert (saved["model"]["pad_token_id"], saved["model"]["decoder_start_token_id"]) == (
        PAD, START)
    assert cli.main(["train", "--config", f"configs/bart_denoise.py:from={workdir}",
                     "--workdir", str(workdir), "--config.train.num_steps=24",
                     "--config.train.log_every=4", "--config.train.eval_batches=0",
                     "--config.train.checkpoint_every=24",
                     "--config.train.progress_bar=False"]) == 0
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == 6 and max(losses[-2:]) < losses[0] - 0.1, losses
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(workdir), "--batches", "1", "--no-baseline",
                     "--json", str(report)]) == 0
    assert json.loads(report.read_text())["step"] == 24
    assert cli.main(["export-hf", str(workdir), str(out)]) == 0

    exported = transformers.BartForConditionalGeneration.from_pretrained(out).eval()
    # BART's config forces </s> at the last step; our decoder does not, so neither does this.
    exported.generation_config.forced_eos_token_id = None
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["But soft, what light through yonder window breaks?", "Good night, sweet prince."]
    enc = loaded(texts, padding=True, return_tensors="pt").input_ids
    assert enc[0].tolist() == tokenizer(texts[0]).input_ids and (enc[1] == PAD).any()
    exp, params, _ = load_checkpoint(workdir)
    with torch.no_grad():
        theirs = exported.generate(enc, attention_mask=enc != PAD, max_new_tokens=12,
                                   do_sample=False, num_beams=1)[:, 1:].numpy()
        labels = enc[:, 1:].contiguous()
        logits = exported(input_ids=enc, attention_mask=enc != PAD, labels=labels).logits
    ours = np.asarray(exp.family.predict_batch(params, {"inputs": enc.numpy()}, max_length=12))
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == PAD).all()
    capsys.readouterr()
    assert cli.main(["infer", "--checkpoint", str(workdir), "--input", texts[0],
                     "--max-length", "12"]) == 0
    first = theirs[0].tolist()
    first = first[: first.index(EOS)] if EOS in first else first
    expected = loaded.decode(first, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert capsys.readouterr().out.splitlines()[-2:] == [texts[0], f"  -> {expected}"]
    # The trained weights themselves: teacher-forced logits on the same rows.
    features = {"inputs": enc.numpy(), "decoder_inputs": np.asarray(
        shift_tokens_right(labels, PAD, START))}
    np.testing.assert_allclose(np.asarray(exp.family._logits(params, features, train=False,
                                                             key=None)),
                               logits.numpy(), atol=1e-4, rtol=0)


def test_ids_that_do_not_fit_the_vocabulary_stop_in_one_sentence(hf_bart):
    """Our vocabularies keep decoder start 0; a tokenizer's pad must be the model's; MASS keeps
    our vocabularies' ids."""
    folder = hf_bart[0]
    cases = [("bart", [], "decoder_start_token_id=2: with this vocabulary"),
             ("bart", [f"data.vocab_path={folder}", "model.pad_token_id=0"],
              "model.pad_token_id=0 is not the vocabulary's padding id 1"),
             ("mass", [f"data.vocab_path={folder}", "model.pad_token_id=1"],
              "MASS trains with our vocabularies' ids")]
    for family, overrides, message in cases:
        config = config_lib.base_config(family)
        config_lib.apply_overrides(config, ["model.decoder_start_token_id=2", *overrides])
        with pytest.raises(UserError, match=message):
            build(config)
