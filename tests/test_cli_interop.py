"""import-hf -> eval/infer -> export-hf through the CLI, checked against transformers: eval's
loss and accuracy and infer's text are the source model's own on the same tokens."""

import json
import os

os.environ.setdefault("USE_TF", "0")

import numpy as np
import pytest
import torch
import transformers
from conftest import run_cli


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = transformers.T5Config(
        vocab_size=8192,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("hf") / "t5"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_import_eval_infer_export_round_trip(hf_dir, tmp_path):
    src, reference = hf_dir
    workdir, out = tmp_path / "imported", tmp_path / "exported"
    result = run_cli(
        "import-hf",
        str(src),
        str(workdir),
        "--config.data.inputs_length=32",
        "--config.data.batch_size=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "config.json").is_file() and (workdir / "checkpoints" / "0").is_dir()

    report_path = tmp_path / "eval.json"
    result = run_cli("eval", "--checkpoint", str(workdir), "--batches", "1", "--no-baseline",
                     "--json", str(report_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    loss, accuracy, tokens, vocab = _transformers_eval(workdir, reference)
    assert report["tokens"] == tokens
    np.testing.assert_allclose(report["loss"], loss, rtol=1e-4)
    assert abs(report["accuracy"] - accuracy) <= 2 / tokens  # a near-tie may flip
    assert f"validation loss     {report['loss']:.4f}" in result.stdout

    text = "To be, or not to be, <extra_id_0> the question"
    result = run_cli("infer", "--checkpoint", str(workdir), "--input", text, "--max-length", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.tensor([vocab.encode(text) + [1]])
    with torch.no_grad():
        greedy = reference.generate(ids, attention_mask=ids != 0, max_new_tokens=8,
                                    do_sample=False, num_beams=1, decoder_start_token_id=0,
                                    eos_token_id=1, pad_token_id=0)[0, 1:].tolist()
    greedy = greedy[: greedy.index(1)] if 1 in greedy else greedy
    assert result.stdout.splitlines()[-2:] == [text, f"  -> {_render(greedy, vocab)}"]

    result = run_cli("export-hf", str(workdir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 1, 0], [8, 9, 10, 11, 1]])
    decoder = torch.tensor([[0, 5, 6], [0, 8, 9]])
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=ids != 0, decoder_input_ids=decoder).logits
        b = exported(input_ids=ids, attention_mask=ids != 0, decoder_input_ids=decoder).logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _transformers_eval(workdir, reference):
    """(loss, token accuracy, target tokens) of ``eval --batches 1`` recomputed with the
    transformers model the checkpoint was imported from, on the same masked batch."""
    import jax

    from t5x_like.evaluation.driver import load_checkpoint
    from t5x_like.evaluation.loop import EVAL_KEY_SALT, device_batches

    exp, _, _ = load_checkpoint(workdir)
    batch = next(device_batches(exp, split=exp.config.data.eval_split, repeat=False,
                                shuffle=False))
    key = jax.random.fold_in(jax.random.fold_in(exp.root_key, EVAL_KEY_SALT), 0)
    features = jax.device_get(exp.family.features(batch, key))
    inputs, targets = (torch.tensor(np.asarray(features[k]), dtype=torch.long)
                       for k in ("inputs", "targets"))
    decoder_inputs = torch.nn.functional.pad(targets, (1, 0))[:, :-1]
    with torch.no_grad():
        logits = reference(input_ids=inputs, attention_mask=inputs != 0,
                           decoder_input_ids=decoder_inputs).logits.double()
    log_p = torch.log_softmax(logits, dim=-1)
    mask = targets > 0
    nll = -log_p.gather(-1, targets[..., None])[..., 0][mask].sum().item()
    correct = (log_p.argmax(-1) == targets)[mask].sum().item()
    count = int(mask.sum())
    return nll / count, correct / count, count, exp.vocabulary


def _render(ids, vocab):
    """What infer prints for generated ids: text runs, sentinels as <extra_id_N>."""
    first_sentinel = vocab.vocab_size - vocab.extra_ids
    parts, run = [], []
    for t in [*ids, None]:
        if t is None or t >= first_sentinel:
            if run:
                parts.append(vocab.decode(run))
                run = []
            if t is not None:
                parts.append(f"<extra_id_{vocab.vocab_size - 1 - t}>")
        else:
            run.append(t)
    return " ".join(parts)


def test_import_refuses_a_folder_without_weights(tmp_path):
    (tmp_path / "src").mkdir()
    result = run_cli("import-hf", str(tmp_path / "src"), str(tmp_path / "out"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "config.json" in line


def _gpt2(path):
    config = transformers.GPT2Config(vocab_size=8192, n_positions=64, n_embd=32, n_layer=1,
                                     n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model, transformers.GPT2LMHeadModel, {"input_ids": torch.tensor([[5, 6, 7, 8]])}


def _bart(path):
    config = transformers.BartConfig(vocab_size=8192, d_model=32, encoder_layers=1,
                                     decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64,
                                     # the BART family trains with our vocabularies' ids
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                     decoder_start_token_id=0, forced_eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 7, 1]]),
              "decoder_input_ids": torch.tensor([[0, 2, 5, 6]])}
    return model, transformers.BartForConditionalGeneration, inputs


@pytest.mark.parametrize(
    "make, family", [pytest.param(_gpt2, "gpt", marks=pytest.mark.slow),
                     pytest.param(_bart, "bart", marks=pytest.mark.slow)]
)
def test_import_export_other_architectures(make, family, tmp_path):
    """import-hf picks the family from config.json; export-hf gives transformers the same model."""
    import json

    reference, cls, inputs = make(tmp_path / "src")
    workdir, out = tmp_path / "imported", tmp_path / "exported"
    result = run_cli("import-hf", str(tmp_path / "src"), str(workdir),
                     "--config.data.inputs_length=32", "--config.data.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["family"] == family
    result = run_cli("export-hf", str(workdir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = cls.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(reference(**inputs).logits.numpy(),
                                      exported(**inputs).logits.numpy())
