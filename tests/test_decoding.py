"""Decoding with the KV cache against transformers' generate() on the same imported weights:
greedy and beam search token for token (T5, GPT-2 with padded prompts, BART), sampling
against transformers' logits warpers and by the distribution of its draws."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import jax
import numpy as np
import pytest
import torch
import transformers
from scipy import stats

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like import decoding
from t5x_like.decoding import Options
from t5x_like.errors import UserError
from t5x_like.interop import hf

MAX_LENGTH = 12
VOCAB = 64
T5_EOS = 15  # a token the T5 below emits at different steps for different rows and beams


def _hf_tokens(out, prompt_length: int, eos_id: int, pad_id: int = 0) -> np.ndarray:
    """transformers' sequences without the start token / prompt, padded to MAX_LENGTH, with
    ``pad_id`` after the first EOS (transformers fills finished beams with EOS when pad is 0)."""
    out = np.asarray(out)[:, prompt_length:].copy()
    out = np.pad(out, ((0, 0), (0, MAX_LENGTH - out.shape[1])), constant_values=pad_id)
    for row in out:
        ends = np.flatnonzero(row == eos_id)
        if ends.size:
            row[ends[0] + 1:] = pad_id
    return out


def _end_steps(tokens: np.ndarray, eos_id: int) -> list[int]:
    """Per row, the step of the first EOS (MAX_LENGTH when there is none)."""
    return [int(np.argmax(r == eos_id)) if (r == eos_id).any() else MAX_LENGTH for r in tokens]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A random T5 with noise on every parameter and its embeddings scaled up 3x, so argmaxes
    change from step to step, depend on the input and beam search leaves the greedy path (as
    built, it repeats one token); encoder rows padded with 0."""
    torch.manual_seed(1)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch_model = transformers.T5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        torch_model.shared.weight.mul_(3.0)
    folder = tmp_path_factory.mktemp("t5")
    torch_model.save_pretrained(folder, safe_serialization=True)
    model, _ = hf.load(folder)
    enc = np.random.RandomState(0).randint(2, VOCAB, (4, 15))
    enc[1, 10:] = 0
    enc[2, 4:] = 0
    return torch_model, model, enc


def _t5_generate(torch_model, enc, **kwargs):
    with torch.no_grad():
        return torch_model.generate(
            input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
            max_new_tokens=MAX_LENGTH, pad_token_id=0, decoder_start_token_id=0, **kwargs)


# --------------------------------------------------------------------------- greedy
def test_greedy_decode_matches_transformers_generate(t5):
    torch_model, model, enc = t5
    free = np.asarray(decoding.greedy_decode(model, enc, max_length=MAX_LENGTH))
    theirs = _t5_generate(torch_model, enc, do_sample=False, num_beams=1, eos_token_id=1)
    np.testing.assert_array_equal(free, _hf_tokens(theirs, 1, eos_id=1))
    assert len(set(free[0].tolist())) > 4  # argmaxes change from step to step
    # A random model rarely says EOS (1); use a token it does emit, so rows stop at different
    # steps and the padding after EOS is exercised.
    eos = T5_EOS
    ours = np.asarray(decoding.greedy_decode(model, enc, max_length=MAX_LENGTH, eos_id=eos))
    theirs = _t5_generate(torch_model, enc, do_sample=False, num_beams=1, eos_token_id=eos)
    np.testing.assert_array_equal(ours, _hf_tokens(theirs, 1, eos_id=eos))
    assert ours.dtype == np.int32 and ours.shape == (4, MAX_LENGTH)
    steps = _end_steps(ours, eos)
    assert len(set(steps)) >= 3 and min(steps) < MAX_LENGTH, steps
    for row, step in zip(ours, steps, strict=True):  # zeros after the first EOS
        assert (row[step + 1:] == 0).all()

    # Callable inside an outer jit (a family's jitted predict step), with the same result.
    inside = jax.jit(lambda e: decoding.greedy_decode(model, e, max_length=MAX_LENGTH,
                                                      eos_id=eos))(enc)
    np.testing.assert_array_equal(np.asarray(inside), ours)


# --------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("alpha,early_stopping,returned", [
    (1.0, False, 4),  # transformers' defaults
    (0.0, True, 1),  # no length penalty; a row stops once 4 hypotheses are finished
    (2.0, "never", 2),  # long hypotheses favoured; stop only when they cannot be beaten
])
def test_beam_search_matches_transformers_generate(t5, alpha, early_stopping, returned):
    """Tokens and length-penalised scores of the best ``returned`` of 4 beams per row (float32
    sums of up to 12 log-probs, at the 1e-4 of every parity test here)."""
    torch_model, model, enc = t5
    theirs = _t5_generate(torch_model, enc, do_sample=False, num_beams=4, eos_token_id=T5_EOS,
                          length_penalty=alpha, early_stopping=early_stopping,
                          num_return_sequences=returned, output_scores=True,
                          return_dict_in_generate=True)
    options = Options(beam_size=4, alpha=alpha, early_stopping=early_stopping,
                      num_return_sequences=returned)

    @jax.jit
    def search(enc):
        stepper = decoding.encoder_decoder(model, enc, max_length=MAX_LENGTH, start_id=0,
                                           repeat=4)
        return decoding.beam.beam_search(stepper, options, batch_size=4, max_length=MAX_LENGTH,
                                         eos_id=T5_EOS)

    tokens, scores = (np.asarray(x) for x in search(enc))
    assert tokens.shape == (4, returned, MAX_LENGTH) and scores.shape == (4, returned)
    ours = tokens.reshape(-1, MAX_LENGTH)
    np.testing.assert_array_equal(ours, _hf_tokens(theirs.sequences, 1, eos_id=T5_EOS))
    np.testing.assert_allclose(scores.reshape(-1), theirs.sequences_scores.numpy(), rtol=0,
                               atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    steps = _end_steps(ours, T5_EOS)
    assert min(steps) < MAX_LENGTH, steps  # EOS reached
    if returned == 4:
        assert len(set(steps)) >= 4, steps  # hypotheses end at different steps, some never


def test_beam_search_leaves_the_greedy_path(t5):
    """``generate`` with beams (one per row); not a vacuous parity: on this model the best
    beam differs from greedy for some rows."""
    torch_model, model, enc = t5
    best = np.asarray(decoding.generate(model, enc, max_length=MAX_LENGTH, eos_id=T5_EOS,
                                        options=Options(beam_size=4)))
    theirs = _t5_generate(torch_model, enc, do_sample=False, num_beams=4, eos_token_id=T5_EOS)
    np.testing.assert_array_equal(best, _hf_tokens(theirs, 1, eos_id=T5_EOS))
    greedy = np.asarray(decoding.greedy_decode(model, enc, max_length=MAX_LENGTH, eos_id=T5_EOS))
    assert (best != greedy).any(axis=1).sum() >= 2
    assert len(set(_end_steps(best, T5_EOS))) >= 3


# --------------------------------------------------------------------------- GPT-2, BART
def test_gpt2_greedy_and_beam_match_transformers_on_padded_prompts(tmp_path):
    """Decoder-only: transformers reads left-padded prompts; ours gets the same prompts
    right-padded (moved left inside), prefills them and generates."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2,
                                     n_head=4, n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, initializer_range=0.3)
    torch_model = transformers.GPT2LMHeadModel(config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = hf.load(tmp_path)
    lengths = [9, 4, 7, 1]
    rng = np.random.RandomState(2)
    left = np.zeros((4, 9), np.int64)
    right = np.zeros((4, 9), np.int64)
    for row, n in enumerate(lengths):
        ids = rng.randint(2, VOCAB, n)
        left[row, 9 - n:], right[row, :n] = ids, ids
    left_valid = left != 0
    free = np.asarray(decoding.generate(model, right, max_length=MAX_LENGTH, eos_id=1))
    eos = int(free[0, 3])
    for options in (Options(), Options(beam_size=3, alpha=1.0, num_return_sequences=3)):
        with torch.no_grad():
            theirs = torch_model.generate(
                input_ids=torch.tensor(left), attention_mask=torch.tensor(left_valid),
                do_sample=False, num_beams=options.beam_size, length_penalty=options.alpha,
                num_return_sequences=options.num_return_sequences, max_new_tokens=MAX_LENGTH,
                eos_token_id=eos, pad_token_id=0)
        ours = np.asarray(decoding.generate(model, right, max_length=MAX_LENGTH, eos_id=eos,
                                            options=options))
        np.testing.assert_array_equal(ours, _hf_tokens(theirs, 9, eos_id=eos))
        assert len(set(_end_steps(ours, eos))) >= 2


def test_bart_greedy_and_beam_match_transformers(tmp_path):
    """BART: padding 1, decoder start 2, positions offset by 2."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
        max_position_embeddings=40, dropout=0.0, init_std=0.2, pad_token_id=1,
        decoder_start_token_id=2, eos_token_id=2, forced_eos_token_id=None)
    torch_model = transformers.BartForConditionalGeneration(config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = hf.load(tmp_path)
    enc = np.random.RandomState(3).randint(3, VOCAB, (3, 11))
    enc[1, 7:] = 1
    enc[2, 3:] = 1
    free = np.asarray(decoding.generate(model, enc, max_length=MAX_LENGTH, eos_id=2, pad_id=1,
                                        start_id=2))
    eos = int(free[0, 3])
    for options in (Options(), Options(beam_size=4, alpha=0.5)):
        with torch.no_grad():
            theirs = torch_model.generate(
                input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 1),
                do_sample=False, num_beams=options.beam_size, length_penalty=options.alpha,
                max_new_tokens=MAX_LENGTH, eos_token_id=eos)
        ours = np.asarray(decoding.generate(model, enc, max_length=MAX_LENGTH, eos_id=eos,
                                            pad_id=1, start_id=2, options=options))
        np.testing.assert_array_equal(ours, _hf_tokens(theirs, 1, eos_id=eos, pad_id=1))
        assert len(set(_end_steps(ours, eos))) >= 2


# --------------------------------------------------------------------------- sampling
def test_warp_logits_matches_transformers_warpers():
    """Temperature, then top-k, then top-p, as transformers' processors in generate()."""
    logits = np.random.RandomState(0).normal(0, 3, (6, VOCAB)).astype(np.float32)
    for temperature, top_k, top_p in [(0.7, 10, 0.8), (1.3, 0, 0.5), (1.0, 5, 1.0),
                                      (0.5, 0, 0.97)]:
        warpers = transformers.LogitsProcessorList(
            [transformers.TemperatureLogitsWarper(temperature)]
            + ([transformers.TopKLogitsWarper(top_k)] if top_k else [])
            + ([transformers.TopPLogitsWarper(top_p)] if top_p < 1 else []))
        theirs = warpers(None, torch.tensor(logits)).numpy()
        ours = np.asarray(decoding.warp_logits(logits, temperature=temperature, top_k=top_k,
                                               top_p=top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
        kept = np.isfinite(theirs)
        assert 0 < kept.sum() < kept.size
        np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_sampling_is_reproducible_per_seed_and_greedy_in_the_limits(t5):
    _, model, enc = t5

    def run(options, seed):
        return np.asarray(decoding.generate(model, enc, max_length=MAX_LENGTH, eos_id=T5_EOS,
                                            options=options, key=jax.random.key(seed)))

    hot = Options(temperature=1.5)
    first = run(hot, 0)
    np.testing.assert_array_equal(run(hot, 0), first)
    assert (run(hot, 1) != first).any()
    greedy = np.asarray(decoding.greedy_decode(model, enc, max_length=MAX_LENGTH, eos_id=T5_EOS))
    assert (first != greedy).any()
    for limit in (Options(temperature=1.5, top_k=1), Options(temperature=1.5, top_p=1e-6),
                  Options(temperature=1e-4)):
        np.testing.assert_array_equal(run(limit, 3), greedy)
    with pytest.raises(UserError, match="key"):
        decoding.generate(model, enc, max_length=MAX_LENGTH, eos_id=1, options=hot)


def test_first_token_draws_follow_the_warped_softmax(t5):
    """20,000 first tokens for one input against softmax(warp(logits)) from transformers'
    model and warpers: no token outside the top-k/top-p set, and a chi-square statistic below
    its 1e-4 tail (a seeded draw: the bound is the chance a correct sampler fails it). The
    same counts must reject the untempered softmax on the same tokens, so the test has
    power."""
    torch_model, model, enc = t5
    row, draws = enc[1:2], 20_000
    temperature, top_k, top_p = 1.5, 12, 0.9
    with torch.no_grad():
        logits = torch_model(input_ids=torch.tensor(row), attention_mask=torch.tensor(row != 0),
                             decoder_input_ids=torch.zeros((1, 1), dtype=torch.long)).logits[:, 0]

    warpers = transformers.LogitsProcessorList([
        transformers.TemperatureLogitsWarper(temperature), transformers.TopKLogitsWarper(top_k),
        transformers.TopPLogitsWarper(top_p)])
    probs = torch.softmax(warpers(None, logits.clone()), -1)[0].numpy().astype(np.float64)
    kept = probs > 0
    assert 4 <= kept.sum() < top_k  # top-p bites after top-k
    options = Options(temperature=temperature, top_k=top_k, top_p=top_p,
                      num_return_sequences=draws)
    tokens = np.asarray(decoding.generate(model, row, max_length=1, eos_id=1, options=options,
                                          key=jax.random.key(7)))[:, 0]
    counts = np.bincount(tokens, minlength=VOCAB)
    assert counts[~kept].sum() == 0
    threshold = stats.chi2.isf(1e-4, df=kept.sum() - 1)

    def chi2(p):
        p = p[kept] / p[kept].sum()
        return float((((counts[kept] - draws * p) ** 2) / (draws * p)).sum())

    assert chi2(probs) < threshold
    untempered = torch.softmax(logits, -1)[0].numpy().astype(np.float64)  # on the same set
    assert chi2(untempered) > 10 * threshold


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs,match", [
    (dict(beam_size=0), "beam_size"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=5), "temperature > 0"),
    (dict(beam_size=2, num_return_sequences=3), "exceeds beam_size"),
    (dict(beam_size=2, temperature=1.0), "deterministic"),
    (dict(num_return_sequences=2), "one sequence"),
    (dict(beam_size=2, early_stopping="sometimes"), "early_stopping"),
])
def test_bad_options_raise_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        Options(**kwargs)


def test_infer_flags_reach_the_decoding_options(monkeypatch, capsys):
    """``t5x-like infer --beam-size/--alpha/--temperature/--top-k/--top-p/--seed`` become
    ``decoding.Options`` for the driver; a bad combination fails in one sentence."""
    from t5x_like import cli
    from t5x_like.evaluation import driver

    seen = {}
    monkeypatch.setattr(driver, "infer", lambda checkpoint, texts, **kw: seen.update(kw) or ["o"])
    base = ["infer", "--checkpoint", "run", "--input", "a text"]
    assert cli.main([*base, "--beam-size", "3", "--alpha", "0.6"]) == 0
    assert seen["options"] == Options(beam_size=3, alpha=0.6) and seen["seed"] == 0
    assert cli.main([*base, "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
                     "--seed", "4"]) == 0
    assert seen["options"] == Options(temperature=0.7, top_k=5, top_p=0.9) and seen["seed"] == 4
    assert cli.main(base) == 0 and seen["options"] == Options()  # greedy by default
    assert cli.main([*base, "--top-k", "5"]) == 2
    assert "set temperature > 0" in capsys.readouterr().err
