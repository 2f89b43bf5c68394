"""XLNet generation with its memory against transformers' ``XLNetLMHeadModel.generate`` (the
oracle), on small random models imported through our HF interop: greedy and beam search token
for token, a padded row as it decodes alone, beam size 1 = greedy, sampling by key."""

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) for nothing

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import t5x_like  # noqa: F401  (turns off eager sharding: modules carry logical names only)
from t5x_like import decoding
from t5x_like.errors import UserError
from t5x_like.families import xlnet as fx
from t5x_like.interop import hf

VOCAB, PROMPT, NEW = 120, 7, 12
# initializer_range 0.2 so the logits are O(1) and greedy paths differ between rows and runs;
# mem_len 6 keeps 4 memory slots (transformers' mems[:-2]), fewer than the 17 tokens decoded.
HF_SMALL = dict(vocab_size=VOCAB, d_model=64, n_layer=2, n_head=4, d_inner=128,
                dropout=0.0, initializer_range=0.2, eos_token_id=None)


def _models(tmp_path_factory, mem_len):
    torch.manual_seed(1)  # a seed whose greedy paths vary (many random models repeat one token)
    theirs = transformers.XLNetLMHeadModel(
        transformers.XLNetConfig(**HF_SMALL, mem_len=mem_len)).eval()
    folder = tmp_path_factory.mktemp("xlnet")
    theirs.save_pretrained(folder, safe_serialization=True)
    ours, config = hf.load(folder)
    assert config.mem_len == (mem_len or 0)
    return theirs, ours


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _models(tmp_path_factory, 6)


def _prompts(seed=0, rows=2):
    return np.random.default_rng(seed).integers(6, VOCAB, (rows, PROMPT))


def _later_new_token(row: list[int], start: int = 2) -> tuple[int, int]:
    """(index, token): the first token at ``start`` or later that the row has not had before,
    an EOS that ends the row there and not earlier."""
    return next((i, t) for i, t in enumerate(row) if i >= start and t not in row[:i])


def _their_tokens(model, prompts, new=NEW, **kw) -> list[list[int]]:
    """transformers' generated tokens, cut after the first EOS, then padded with 0 to ``new``."""
    eos = kw.get("eos_token_id")
    with torch.no_grad():
        out = model.generate(torch.tensor(prompts), max_new_tokens=new, pad_token_id=0,
                             do_sample=False, **kw)[:, prompts.shape[1]:].tolist()
    rows = []
    for row in out:
        if eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row + [0] * (new - len(row)))
    return rows


def test_greedy_equals_transformers_generate_and_a_padded_row_decodes_as_alone(models):
    theirs, ours = models
    prompts = _prompts()
    short = prompts[1, 3:]  # row 2 is row 1's last 4 tokens, padded on the right
    batch = np.concatenate([prompts, np.pad(short, (0, PROMPT - len(short)))[None]])
    before = fx._generate._cache_size()
    got = np.asarray(fx.generate(ours, batch, max_length=NEW, eos_id=-1)).tolist()
    want = _their_tokens(theirs, prompts) + _their_tokens(theirs, short[None])
    assert got == want
    assert len({tuple(r) for r in got}) == 3 and len(set(got[1])) > 2
    # Another prompt of the same shape runs the same compiled loop: no compile per step or call.
    again = np.asarray(fx.generate(ours, batch[::-1], max_length=NEW, eos_id=-1)).tolist()
    assert again == got[::-1] and fx._generate._cache_size() == before + 1


@pytest.mark.slow  # tests/test_generation_families.py checks it on the family in the default run
def test_beam_size_one_equals_greedy_and_stops_at_eos(models):
    import jax
    from flax import nnx

    from t5x_like.beam_search import beam_search

    _, ours = models
    prompts = _prompts(1, rows=3)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def both(eos, model_state):  # beam search's own loop, not decoding.search's greedy
        stepper = lambda: fx.left_to_right_stepper(  # noqa: E731
            nnx.merge(graphdef, model_state), jnp.asarray(prompts), jnp.ones(prompts.shape, bool),
            max_length=NEW, pad_id=0)
        greedy = decoding.greedy(stepper(), max_length=NEW, eos_id=eos)
        beam, _ = beam_search(stepper(), decoding.Options(beam_size=1, alpha=0.0),
                              batch_size=3, max_length=NEW, eos_id=eos)
        return greedy, beam[:, 0]

    greedy, beam = map(np.asarray, both(-1, state))
    assert greedy.tolist() == beam.tolist()
    at, eos = _later_new_token(greedy[0].tolist())  # now an EOS that ends row 0 at ``at``
    greedy, beam = map(np.asarray, both(eos, state))
    assert greedy.tolist() == beam.tolist()
    assert beam[0, at] == eos and (beam[0, at + 1:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("mem_len", [None, 2])
def test_greedy_equals_transformers_with_unbounded_or_no_memory(tmp_path_factory, mem_len):
    theirs, ours = _models(tmp_path_factory, mem_len)  # None: every state kept; 2: none
    prompts = _prompts(2)
    got = np.asarray(fx.generate(ours, prompts, max_length=NEW, eos_id=-1)).tolist()
    assert got == _their_tokens(theirs, prompts)


@pytest.mark.slow
def test_beam_search_equals_transformers_beam_search(models):
    theirs, ours = models
    prompts = _prompts(3)
    first = _their_tokens(theirs, prompts, num_beams=3)
    _, eos = _later_new_token(first[0])  # a token the best beam emits: some end early
    want = _their_tokens(theirs, prompts, num_beams=3, num_return_sequences=2,
                         eos_token_id=eos)
    got = fx.generate(ours, prompts, max_length=NEW, eos_id=eos,
                      options=decoding.Options(beam_size=3, num_return_sequences=2))
    assert np.asarray(got).tolist() == want
    assert any(eos in row[:-1] for row in want)


@pytest.mark.slow
def test_sampling_is_fixed_by_the_key_and_top_k_one_is_greedy(models):
    import jax

    _, ours = models
    prompts = _prompts(4)

    def draw(seed, **kw):
        options = decoding.Options(temperature=1.0, num_return_sequences=2, **kw)
        return np.asarray(fx.generate(ours, prompts, max_length=NEW, eos_id=-1, options=options,
                                      key=jax.random.key(seed))).tolist()

    assert draw(1) == draw(1) and draw(1) != draw(2)
    greedy = np.asarray(fx.generate(ours, prompts, max_length=NEW, eos_id=-1))
    assert draw(3, top_k=1) == np.repeat(greedy, 2, axis=0).tolist()


def test_bad_generation_requests_end_in_one_sentence(models, tmp_path):
    _, ours = models
    with pytest.raises(UserError, match="needs a random key"):
        fx.generate(ours, _prompts(), max_length=4, eos_id=-1,
                    options=decoding.Options(temperature=1.0))
    torch.manual_seed(0)
    transformers.XLNetLMHeadModel(transformers.XLNetConfig(**HF_SMALL, mem_len=6, reuse_len=3)
                                  ).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UserError, match="reuse_len=3"):
        fx.generate(hf.load(tmp_path)[0], _prompts(), max_length=4, eos_id=-1)


@pytest.mark.slow
def test_family_predict_batch_equals_transformers_on_the_exported_model(tmp_path):
    """The family's prompts ([EOS] + prompt, its final EOS dropped, right-padded) through
    predict_batch equal transformers' generate of each row alone on our exported weights."""
    import jax
    from conftest import ROOT

    from t5x_like import config as config_lib
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families import get_family
    from t5x_like.interop import hf_xlnet

    os.chdir(ROOT)
    vocabulary = get_vocabulary(None)
    config = config_lib.load_config("configs/xlnet_plm.py:tiny", [
        "model.d_model=64", "model.num_heads=2", "model.d_ff=128", "model.mem_len=6"])
    family = get_family(config_lib.resolve(config, vocabulary.vocab_size), vocabulary)
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x,  # logits far apart
                          family.init(jax.random.key(0)))
    hf_xlnet.export(family.model(params), family.model_config, tmp_path)
    theirs = transformers.XLNetLMHeadModel.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(5)
    inputs = np.zeros((3, 9), np.int32)
    for row, n in zip(inputs, [4, 8, 2], strict=True):
        row[:n], row[n] = rng.integers(10, 3000, n), family.eos_id
    got = np.asarray(family.predict_batch(params, {"inputs": inputs}, max_length=NEW)).tolist()
    want = [_their_tokens(theirs, np.array([[family.eos_id, *row[row > 0][:-1]]]),
                          eos_token_id=family.eos_id)[0] for row in inputs]
    assert got == want and len({tuple(r) for r in got}) == 3
