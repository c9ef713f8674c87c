"""How validation text is held out: by document, by data.val_path, or a document's tail."""

import pytest

from raylm.config import ConfigError, load_config
from raylm.documents import tail_split, val_split_mode
from raylm.storage import FileInfo


def files(*names):
    return [FileInfo(uri=f"/c/{n}", size=1, etag_or_mtime="x") for n in names]


def cfg(*overrides):
    return load_config(overrides=list(overrides)).data


def test_auto_holds_out_the_tail_of_too_few_text_files():
    assert val_split_mode(cfg(), files("book.txt"), []) == "tail"
    assert val_split_mode(cfg(), files(*[f"{i}.txt" for i in range(150)]), []) == "tail"  # 3 expected
    many = files(*[f"{i}.txt" for i in range(1000)])  # 1000 * 0.02 = 20 expected held-out documents
    assert val_split_mode(cfg(), many, []) == "document"
    assert val_split_mode(cfg(), files("a.jsonl"), []) == "document"  # a jsonl file holds many documents
    assert val_split_mode(cfg(), files("book.txt"), files("v.txt")) == "files"
    assert val_split_mode(cfg("data.val_split=document"), files("book.txt"), []) == "document"
    assert val_split_mode(cfg("data.val_split=tail"), files("a.jsonl"), []) == "tail"


def test_bad_val_split_is_named():
    with pytest.raises(ConfigError, match="data.val_split='lines'"):
        cfg("data.val_split=lines")


@pytest.mark.parametrize("text", ["x" * 1000, "line\n" * 200, "one long line " * 50 + "\nshort\n", "ab"])
def test_tail_split_is_a_cut_of_about_the_fraction(text):
    head, tail = tail_split(text, 0.1)
    assert head + tail == text and head and tail
    assert len(tail) <= max(2 * round(len(text) * 0.1), 1) + 1
    if text.startswith("line"):
        assert head.endswith("\n")  # a line is never split when a break is near the cut


def test_pii_across_the_tail_cut_is_redacted_and_counted_once():
    # The cut comes after redaction: an address split in two would be found in neither half.
    import json

    from raylm.config import DataConfig
    from raylm.documents import parse_and_clean

    text = "word " * 17 + "call 415-555-0132 or mail jane.doe@example.com today x"
    out = parse_and_clean({"path": ["c/a.jsonl"], "bytes": [json.dumps({"text": text}).encode() + b"\n"]},
                          DataConfig(val_fraction=0.1), redact=("email", "phone", "ip", "card"), tail=True)
    head, tail = out["text"]
    assert list(out["val"]) == [False, True] and list(out["tail"]) == [False, True]
    assert head + tail == "word " * 17 + "call <PHONE> or mail <EMAIL> today x"
    assert tail == "<EMAIL> today x"  # nor is a placeholder cut
    assert "example" not in head + tail and "555" not in head + tail
    assert out["pii_email"].sum() == 1 and out["pii_phone"].sum() == 1
    assert list(out["chars"]) == [len(text), 0]  # the document's length, once


def test_a_document_split_into_head_and_tail_counts_once():
    import pyarrow as pa

    from raylm.config import DataConfig
    from raylm.data import PrepareStats, _account
    from raylm.documents import parse_and_clean

    cfg = DataConfig(val_fraction=0.3)
    out = parse_and_clean({"path": ["c/book.txt"], "bytes": [("a line of text\n" * 20).encode()]}, cfg,
                          redact=cfg.redact_pii, tail=True)
    stats = PrepareStats()
    _account(pa.table(out), stats, cfg)
    assert (stats.documents_read, stats.documents, stats.val_documents) == (1, 1, 1)
    assert stats.chars.n == 1 and stats.chars.max == len(("a line of text\n" * 20).strip("\n"))
