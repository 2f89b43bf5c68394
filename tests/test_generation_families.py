"""Generation of the families that decode only through their own objective's layout: MASS
(BART's encoder-decoder, decoding from <mask>) and UniLM (seq2seq mode, recomputed each step).

Two checks per family, on randomly initialised tiny models (weights scaled up so logits are
far apart and an argmax does not hang on float rounding):

- greedy equals beam search with beam size 1, token for token, including where a row stops at
  its EOS (the EOS is moved to a token greedy emits, so both paths must stop there);
- greedy equals an oracle written here that runs the model's full forward (no cache, no
  stepper) on the growing sequence and takes the argmax at the predicted position.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from t5x_like import config as config_lib
from t5x_like import decoding
from t5x_like.beam_search import beam_search
from t5x_like.objectives.unilm import prefix_lm_mask

MAX_LENGTH = 8


def _family(spec: str, *overrides: str):
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families import get_family

    os.chdir(ROOT)
    vocabulary = get_vocabulary(None)
    config = config_lib.load_config(spec, list(overrides))
    return get_family(config_lib.resolve(config, vocabulary.vocab_size), vocabulary)


def _params(family, scale: float = 8.0):
    """Random weights with matrices scaled up: wider logit gaps than the 0.02 init gives."""
    params = family.init(jax.random.key(0))
    return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


def _sources(rng: np.random.Generator, lengths: list[int], low: int = 10,
             high: int = 3000) -> np.ndarray:
    """Right-padded rows of ordinary ids, one length per row, each ending in EOS (1)."""
    out = np.zeros((len(lengths), max(lengths) + 1), np.int32)
    for row, n in zip(out, lengths, strict=True):
        row[:n] = rng.integers(low, high, n)
        row[n] = 1
    return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _padded(tokens: list[int], length: int) -> list[int]:
    return tokens + [0] * (length - len(tokens))


# --------------------------------------------------------------------------- MASS

MASS = ("configs/mass.py:tiny", "model.d_model=64", "model.num_heads=2", "model.d_ff=128",
        "model.num_encoder_layers=1", "model.num_decoder_layers=2", "data.inputs_length=32")


@pytest.fixture(scope="module")
def mass():
    family = _family(*MASS)
    return family, _params(family), _sources(np.random.default_rng(0), [5, 9, 3])


def _mass_oracle(family, params, inputs: np.ndarray, eos: int) -> list[list[int]]:
    """Argmax of the full encoder-decoder forward on [<mask>, generated...] per step (the
    decoder is causal, so padding the decoder input to a fixed width changes no earlier
    position; one compile)."""
    forward = jax.jit(lambda enc, dec: family.model(params)(enc, dec))
    decoder = np.zeros((len(inputs), MAX_LENGTH + 1), np.int32)
    decoder[:, 0] = family.token_ids.mask
    done = np.zeros(len(inputs), bool)
    for i in range(MAX_LENGTH):
        token = np.asarray(jnp.argmax(forward(inputs, decoder)[:, i], axis=-1))
        decoder[:, i + 1] = np.where(done, 0, token)
        done |= token == eos
    return [_padded(_until_eos(row[1:].tolist(), eos), MAX_LENGTH) for row in decoder]


def test_mass_greedy_equals_the_full_forward_argmax(mass):
    family, params, inputs = mass
    got = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=MAX_LENGTH))
    assert got.shape == (3, MAX_LENGTH)
    assert got.tolist() == _mass_oracle(family, params, inputs, family.token_ids.eos)
    assert len({tuple(r) for r in got.tolist()}) > 1  # the rows decode their own sources


def test_mass_greedy_equals_beam_size_one_and_stops_at_eos(mass):
    family, params, inputs = mass
    model = family.model(params)
    start = family.token_ids.mask

    graphdef, state = nnx.split(model)

    @jax.jit
    def both(eos, model_state):
        stepper = lambda: decoding.encoder_decoder(  # noqa: E731
            nnx.merge(graphdef, model_state), jnp.asarray(inputs), max_length=MAX_LENGTH,
            start_id=start)
        greedy = decoding.greedy(stepper(), max_length=MAX_LENGTH, eos_id=eos)
        beam, _ = beam_search(stepper(), decoding.Options(beam_size=1, alpha=0.0),
                              batch_size=3, max_length=MAX_LENGTH, eos_id=eos)
        return greedy, beam[:, 0]

    def run(eos: int):
        greedy, beam = both(eos, state)
        return np.asarray(greedy), np.asarray(beam)

    greedy, beam = run(family.token_ids.eos)
    assert greedy.tolist() == beam.tolist()
    eos = int(greedy[0, 2])  # a token row 0 emits third: it now ends that row there
    greedy, beam = run(eos)
    assert greedy.tolist() == beam.tolist()
    assert greedy[0, 2] == eos and (greedy[0, 3:] == 0).all()


@pytest.mark.slow
def test_mass_predict_batch_beam_search_and_sampling(mass):
    family, params, inputs = mass
    beams = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=MAX_LENGTH,
                                            options=decoding.Options(beam_size=3)))
    assert beams.shape == (3, MAX_LENGTH)
    options = decoding.Options(temperature=1.0)
    draw = lambda seed: np.asarray(family.predict_batch(  # noqa: E731
        params, {"inputs": inputs}, max_length=MAX_LENGTH, options=options,
        key=jax.random.key(seed)))
    assert draw(1).tolist() == draw(1).tolist()
    assert draw(1).tolist() != draw(2).tolist()


# --------------------------------------------------------------------------- UniLM

UNILM = ("configs/unilm.py:tiny", "model.d_model=64", "model.num_heads=2", "model.d_kv=32",
         "model.d_ff=128", "model.num_layers=2", "model.max_length=64",
         "data.inputs_length=32")


@pytest.fixture(scope="module")
def unilm():
    family = _family(*UNILM)
    return family, _params(family), _sources(np.random.default_rng(1), [6, 2, 10])


def _unilm_oracle(family, params, inputs: np.ndarray, eos: int) -> list[list[int]]:
    """Per row: [EOS] + source (its final EOS dropped) as the bidirectional prefix, the target
    so far causal, one <mask> appended; the argmax at the <mask> is the next token. Rows are
    contiguous from position 0 with padding after them (never attended); one compile."""
    prefixes = []
    for row in inputs:
        ids = [t for t in row.tolist() if t != 0]
        prefixes.append([1] + (ids[:-1] if ids[-1] == 1 else ids))
    width = max(map(len, prefixes)) + MAX_LENGTH
    lengths = jnp.asarray([len(p) for p in prefixes])

    @jax.jit
    def forward(seq, valid):
        mask = jax.vmap(prefix_lm_mask)(valid, lengths)
        return family.model(params)(seq, attention_mask=mask)

    generated: list[list[int]] = [[] for _ in prefixes]
    for _ in range(MAX_LENGTH):
        seq = np.zeros((len(prefixes), width), np.int32)
        for row, p, g in zip(seq, prefixes, generated, strict=True):
            row[: len(p) + len(g) + 1] = p + g + [family.mask_id]
        logits = forward(seq, seq != 0)
        for r, (p, g) in enumerate(zip(prefixes, generated, strict=True)):
            if not g or g[-1] != eos:
                g.append(int(jnp.argmax(logits[r, len(p) + len(g)])))
    return [_padded(g, MAX_LENGTH) for g in generated]


def test_unilm_greedy_equals_the_full_forward_argmax(unilm):
    family, params, inputs = unilm
    got = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=MAX_LENGTH))
    assert got.shape == (3, MAX_LENGTH)
    assert got.tolist() == _unilm_oracle(family, params, inputs, family.eos_id)
    assert len({tuple(r) for r in got.tolist()}) > 1


def test_unilm_greedy_equals_beam_size_one_and_stops_at_eos(unilm):
    from t5x_like.families.unilm import seq2seq_stepper

    family, params, inputs = unilm
    graphdef, state = nnx.split(family.model(params))
    sources = np.pad(np.where(inputs == 1, 0, inputs), ((0, 0), (1, 0)), constant_values=1)

    @jax.jit
    def both(eos, model_state):
        stepper = lambda: seq2seq_stepper(  # noqa: E731
            nnx.merge(graphdef, model_state), jnp.asarray(sources), jnp.asarray(sources != 0),
            max_length=MAX_LENGTH, mask_id=family.mask_id)
        greedy = decoding.greedy(stepper(), max_length=MAX_LENGTH, eos_id=eos)
        beam, _ = beam_search(stepper(), decoding.Options(beam_size=1, alpha=0.0),
                              batch_size=3, max_length=MAX_LENGTH, eos_id=eos)
        return greedy, beam[:, 0]

    greedy, beam = map(np.asarray, both(family.eos_id, state))
    assert greedy.tolist() == beam.tolist()
    eos = int(greedy[1, 3])  # a token row 1 emits fourth: it now ends that row there
    greedy, beam = map(np.asarray, both(eos, state))
    assert greedy.tolist() == beam.tolist()
    assert greedy[1, 3] == eos and (greedy[1, 4:] == 0).all()


@pytest.mark.slow
def test_unilm_predict_batch_beam_search_and_sampling(unilm):
    family, params, inputs = unilm
    beams = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=MAX_LENGTH,
                                            options=decoding.Options(beam_size=2)))
    assert beams.shape == (3, MAX_LENGTH)
    options = decoding.Options(temperature=1.0)
    draw = lambda seed: np.asarray(family.predict_batch(  # noqa: E731
        params, {"inputs": inputs}, max_length=MAX_LENGTH, options=options,
        key=jax.random.key(seed)))
    assert draw(1).tolist() == draw(1).tolist()
    assert draw(1).tolist() != draw(2).tolist()


# --------------------------------------------------------------------------- XLNet

XLNET = ("configs/xlnet_plm.py:tiny", "model.d_model=64", "model.num_heads=2", "model.d_ff=128",
         "model.num_layers=2", "data.inputs_length=32")


@pytest.fixture(scope="module")
def xlnet():
    family = _family(*XLNET)
    return family, _params(family), _sources(np.random.default_rng(2), [4, 7, 2])


# Greedy decoding against transformers' XLNetLMHeadModel.generate (its dummy-token passes over
# the memory) is tests/test_xlnet_generate.py's.


def test_xlnet_greedy_equals_beam_size_one_and_stops_at_eos(xlnet):
    from t5x_like.families.xlnet import left_to_right_stepper

    family, params, inputs = xlnet
    graphdef, state = nnx.split(family.model(params))
    prompts = np.pad(np.where(inputs == 1, 0, inputs), ((0, 0), (1, 0)), constant_values=1)

    @jax.jit
    def both(eos, model_state):
        stepper = lambda: left_to_right_stepper(  # noqa: E731
            nnx.merge(graphdef, model_state), jnp.asarray(prompts), jnp.asarray(prompts != 0),
            max_length=MAX_LENGTH, pad_id=0)
        greedy = decoding.greedy(stepper(), max_length=MAX_LENGTH, eos_id=eos)
        beam, _ = beam_search(stepper(), decoding.Options(beam_size=1, alpha=0.0),
                              batch_size=3, max_length=MAX_LENGTH, eos_id=eos)
        return greedy, beam[:, 0]

    greedy, beam = map(np.asarray, both(family.eos_id, state))
    assert greedy.tolist() == beam.tolist()
    eos = int(greedy[2, 2])
    greedy, beam = map(np.asarray, both(eos, state))
    assert greedy.tolist() == beam.tolist()
    assert greedy[2, 2] == eos and (greedy[2, 3:] == 0).all()


@pytest.mark.slow
def test_xlnet_predict_batch_beam_search_and_sampling(xlnet):
    family, params, inputs = xlnet
    beams = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=MAX_LENGTH,
                                            options=decoding.Options(beam_size=2)))
    assert beams.shape == (3, MAX_LENGTH)
    options = decoding.Options(temperature=1.0)
    draw = lambda seed: np.asarray(family.predict_batch(  # noqa: E731
        params, {"inputs": inputs}, max_length=MAX_LENGTH, options=options,
        key=jax.random.key(seed)))
    assert draw(1).tolist() == draw(1).tolist()
    assert draw(1).tolist() != draw(2).tolist()
