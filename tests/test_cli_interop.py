"""import-hf -> eval/infer -> export-hf through the CLI, checked against transformers."""

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

    result = run_cli("eval", "--checkpoint", str(workdir), "--batches", "1", "--no-baseline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation loss" in result.stdout

    result = run_cli(
        "infer",
        "--checkpoint",
        str(workdir),
        "--input",
        "To be, or not to be, <extra_id_0> the question",
        "--max-length",
        "8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "->" in result.stdout

    result = run_cli("export-hf", str(workdir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 1, 0], [8, 9, 10, 11, 1]])
    decoder = torch.tensor([[0, 5, 6], [0, 8, 9]])
    with torch.no_grad():
        a = reference(input_ids=ids, attention_mask=ids != 0, decoder_input_ids=decoder).logits
        b = exported(input_ids=ids, attention_mask=ids != 0, decoder_input_ids=decoder).logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())


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
