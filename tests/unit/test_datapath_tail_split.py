"""data.val_fraction=0 with the tail split (data.val_split=tail, or auto on a corpus of text
files) holds out nothing: it held out every document's last character, so the run validated
on blocks of `e EOS e EOS ...` and trained no document's last character, without a word.
Now the prepare stops on its empty validation split, as a split by document does."""

from __future__ import annotations

import pytest

from raylm.config import DataConfig, load_config
from raylm.data import DataError, prepare
from raylm.documents import parse_and_clean, tail_split


@pytest.mark.parametrize("text", ["x", "ab", "note\nsome words here\n", "y" * 1000])
def test_a_fraction_of_zero_holds_out_nothing(text):
    assert tail_split(text, 0.0) == (text, "")


def test_a_small_fraction_still_holds_out_a_tail():
    head, tail = tail_split("ab", 0.01)  # as before: a short document's tail is one character
    assert (head, tail) == ("a", "b")


def test_the_stage_trains_each_document_whole_at_a_fraction_of_zero():
    out = parse_and_clean({"path": ["a.txt"], "bytes": [b"first line\nsecond line\n"]},
                          DataConfig(val_fraction=0.0, val_split="tail"), tail=True)
    assert list(out["text"]) == ["first line\nsecond line"] and list(out["val"]) == [False]


def test_prepare_refuses_a_validation_split_of_last_characters(tmp_path):
    from raylm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"f{i:02d}.txt").write_text(f"note {i}\n" + "some words here and there\n" * 20)
    tok = train_tokenizer([(corpus / "f00.txt").read_text() * 5], str(tmp_path / "tok"), vocab_size=300)
    cfg = load_config(overrides=[f"data.path={corpus}", "data.seq_len=16", "data.dedup=none",
                                 "data.val_fraction=0"]).data
    with pytest.raises(DataError, match=r"validation split is empty .*data\.val_fraction \(now 0\.0\)"):
        prepare(cfg, tok, str(tmp_path / "out"), seed=0, log=lambda *_: None)
