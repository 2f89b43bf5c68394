"""The small verbs a user runs first: ``vocab train`` (step 1 of ``make demo``) and ``tasks``.

Called through ``cli.main`` in this process, as the console script calls it; what they write
and print is checked against SentencePiece's own reader and seqio's registries.
"""

import sentencepiece as spm
import seqio

from t5x_like import cli

SPEECHES = [f"{who}: {line}" for who in ("HAMLET", "OPHELIA", "HORATIO") for line in (
    "To be, or not to be, that is the question.",
    "Good my lord, how does your honour for this many a day?",
    "There are more things in heaven and earth than are dreamt of in your philosophy.",
    "The lady doth protest too much, methinks.",
)] * 20


def test_vocab_train_writes_a_sentencepiece_model_and_keeps_it(tmp_path, capsys):
    source, out = tmp_path / "speeches.txt", tmp_path / "vocab.model"
    source.write_text("\n".join(SPEECHES) + "\n")
    assert cli.main(["vocab", "train", "--source", str(source), "--size", "300",
                     "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.get_piece_size() == 300
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    for line in SPEECHES[:4]:
        ids = sp.encode(line)
        assert 2 not in ids and sp.decode(ids) == line  # covered by the trained pieces
    # The model as our configs read it: 300 pieces + 100 sentinels.
    from t5x_like.data.vocab import get_vocabulary

    vocab = get_vocabulary(str(out))
    assert vocab.vocab_size == 400 and vocab.decode(vocab.encode(SPEECHES[0])) == SPEECHES[0]

    before = out.read_bytes()
    assert cli.main(["vocab", "train", "--source", str(source), "--size", "300",
                     "--out", str(out)]) == 0
    assert "exists (pass --force" in capsys.readouterr().out and out.read_bytes() == before


def test_vocab_train_with_too_many_pieces_is_one_sentence(tmp_path, capsys):
    source = tmp_path / "tiny.txt"
    source.write_text("a b c\n")
    assert cli.main(["vocab", "train", "--source", str(source), "--size", "5000",
                     "--out", str(tmp_path / "v.model")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot train vocabulary") and "5000" in line


def test_tasks_lists_every_registered_task_and_mixture(capsys):
    assert cli.main(["tasks"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    listed = {(kind, name) for kind, name, *_ in rows}
    expected = ({("task", n) for n in seqio.TaskRegistry.names()}
                | {("mixture", n) for n in seqio.MixtureRegistry.names()})
    assert listed == expected and len(rows) == len(expected)
    (shakespeare,) = [r for r in rows if r[1] == "shakespeare"]
    assert "train" in " ".join(shakespeare) and "validation" in " ".join(shakespeare)
