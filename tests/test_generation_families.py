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
    """Argmax of the full encoder-decoder forward on [<mask>, generated...] per step."""
    model = family.model(params)
    out = []
    for row in inputs:
        decoder = [family.token_ids.mask]
        for _ in range(MAX_LENGTH):
            logits = model(jnp.asarray(row[None]), jnp.asarray([decoder], jnp.int32))
            decoder.append(int(jnp.argmax(logits[0, -1])))
            if decoder[-1] == eos:
                break
        out.append(_padded(decoder[1:], MAX_LENGTH))
    return out


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

    def run(eos: int):
        stepper = lambda: decoding.encoder_decoder(  # noqa: E731
            model, jnp.asarray(inputs), max_length=MAX_LENGTH, start_id=start)
        greedy = decoding.greedy(stepper(), max_length=MAX_LENGTH, eos_id=eos)
        beam, _ = beam_search(stepper(), decoding.Options(beam_size=1, alpha=0.0),
                              batch_size=3, max_length=MAX_LENGTH, eos_id=eos)
        return np.asarray(greedy), np.asarray(beam)[:, 0]

    greedy, beam = run(family.token_ids.eos)
    assert greedy.tolist() == beam.tolist()
    eos = int(greedy[0, 2])  # a token row 0 emits third: it now ends that row there
    greedy, beam = run(eos)
    assert greedy.tolist() == beam.tolist()
    assert greedy[0, 2] == eos and (greedy[0, 3:] == 0).all()
    assert greedy.tolist() == _mass_oracle(family, params, inputs, eos)


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
    so far causal, one <mask> appended; the argmax at the <mask> is the next token."""
    model = family.model(params)
    out = []
    for row in inputs:
        ids = [t for t in row.tolist() if t != 0]
        prefix = [1] + (ids[:-1] if ids[-1] == 1 else ids)
        generated: list[int] = []
        for _ in range(MAX_LENGTH):
            seq = prefix + generated + [family.mask_id]
            mask = prefix_lm_mask(jnp.ones(len(seq), bool), len(prefix))
            logits = model(jnp.asarray([seq], jnp.int32), attention_mask=mask[None])
            generated.append(int(jnp.argmax(logits[0, -1])))
            if generated[-1] == eos:
                break
        out.append(_padded(generated, MAX_LENGTH))
    return out


def test_unilm_greedy_equals_the_full_forward_argmax(unilm):
    family, params, inputs = unilm
    got = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=MAX_LENGTH))
    assert got.shape == (3, MAX_LENGTH)
    assert got.tolist() == _unilm_oracle(family, params, inputs, family.eos_id)
    assert len({tuple(r) for r in got.tolist()}) > 1


def test_unilm_greedy_equals_beam_size_one_and_stops_at_eos(unilm):
    from flax import nnx

    from t5x_like.families.unilm import _generate, seq2seq_stepper

    family, params, inputs = unilm
    graphdef, state = nnx.split(family.model(params))
    sources = np.pad(np.where(inputs == 1, 0, inputs), ((0, 0), (1, 0)), constant_values=1)

    def run(eos: int, options: decoding.Options) -> np.ndarray:
        return np.asarray(_generate(graphdef, state, jnp.asarray(sources),
                                    jnp.asarray(sources != 0), jax.random.key(0),
                                    options=options, max_length=MAX_LENGTH,
                                    ids=(eos, 0, family.mask_id)))

    greedy = run(family.eos_id, decoding.Options())
    eos = int(greedy[1, 3])
    greedy = run(eos, decoding.Options())
    assert greedy[1, 3] == eos and (greedy[1, 4:] == 0).all()
    assert greedy.tolist() == _unilm_oracle(family, params, inputs, eos)
    # beam search with one beam, through beam_search itself (Options(beam_size=1) is greedy)
    def beam_one(model_state):
        model = nnx.merge(graphdef, model_state)
        s = seq2seq_stepper(model, jnp.asarray(sources), jnp.asarray(sources != 0),
                            max_length=MAX_LENGTH, mask_id=family.mask_id)
        return beam_search(s, decoding.Options(beam_size=1, alpha=0.0), batch_size=3,
                           max_length=MAX_LENGTH, eos_id=eos)[0][:, 0]

    assert np.asarray(jax.jit(beam_one)(state)).tolist() == greedy.tolist()


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
