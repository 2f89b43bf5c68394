"""Greedy decoding with the KV cache against transformers' generate() on the same weights."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import jax
import numpy as np
import torch
import transformers

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like import decoding
from t5x_like.interop import hf

MAX_LENGTH = 12


def _hf_greedy(model, enc, eos_id):
    """transformers' greedy tokens without the leading decoder start token, padded with 0."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                             do_sample=False, num_beams=1, max_new_tokens=MAX_LENGTH,
                             eos_token_id=eos_id, pad_token_id=0, decoder_start_token_id=0)
    out = out.numpy()
    assert (out[:, 0] == 0).all()
    return np.pad(out[:, 1:], ((0, 0), (0, MAX_LENGTH + 1 - out.shape[1])))


def test_greedy_decode_matches_transformers_generate(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch_model = transformers.T5ForConditionalGeneration(config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = hf.load(tmp_path)

    rng = np.random.RandomState(0)
    enc = rng.randint(2, config.vocab_size, (4, 15))
    enc[1, 10:] = 0
    enc[2, 4:] = 0
    # A random model rarely says EOS (1); use a token it does emit, so rows stop at different
    # steps and the padding after EOS is exercised.
    free = np.asarray(decoding.greedy_decode(model, enc, max_length=MAX_LENGTH))
    np.testing.assert_array_equal(free, _hf_greedy(torch_model, enc, eos_id=1))
    eos = int(free[0, 3])
    ours = np.asarray(decoding.greedy_decode(model, enc, max_length=MAX_LENGTH, eos_id=eos))
    theirs = _hf_greedy(torch_model, enc, eos_id=eos)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.int32 and ours.shape == (4, MAX_LENGTH)
    stopped = (ours == eos).any(axis=1)
    assert stopped.any()
    for row in np.flatnonzero(stopped):  # zeros after the first EOS
        first = int(np.argmax(ours[row] == eos))
        assert (ours[row, first + 1:] == 0).all()

    # Callable inside an outer jit (a family's jitted predict step), with the same result.
    inside = jax.jit(lambda e: decoding.greedy_decode(model, e, max_length=MAX_LENGTH,
                                                      eos_id=eos))(enc)
    np.testing.assert_array_equal(np.asarray(inside), ours)
