"""Corpus files at the edges of their formats, read without a cluster: text in UTF-16 or
UTF-32 with a byte order mark, an empty text file, parquet text stored as bytes, a record
naming its text field twice, and the damaged or odd files that already read right (kept
so they stay that way). Each either reads correctly or is a bad record naming its file
(and line or row), charged to data.max_bad_records."""

from __future__ import annotations

import codecs
import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import DataConfig, load_config
from raylm.data import DataError, prepare
from raylm.documents import json_lines, parse_and_clean, parse_documents


def _docs(path: str, raw: bytes, field: str = "text") -> list:
    return [(line, str(d) if isinstance(d, DataError) else d) for line, d in parse_documents(path, raw, field)]


def _clean(path: str, raw: bytes) -> dict:
    out = parse_and_clean({"path": np.array([path], dtype=object), "bytes": np.array([raw], dtype=object)},
                          DataConfig())
    return {k: list(out[k]) for k in ("text", "error", "dropped", "line")}


def _parquet(table: pa.Table, **kw) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


# --------------------------------------------------------------------------- encodings

WIDE = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
BOMS = {"utf-16": b"", "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32": b"", "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}


def _wide(text: str, codec: str) -> bytes:
    """`text` as Notepad's or Excel's "Unicode text" writes it: the encoding's mark first."""
    return BOMS[codec] + text.encode(codec)


@pytest.mark.parametrize("codec", WIDE)
def test_text_in_utf16_or_utf32_with_its_mark_is_read_as_text(codec):
    """Was one bad record, 'not valid UTF-8 (byte 0xff at offset 0)', for the whole file."""
    assert _docs("d/a.txt", _wide("Grüße, 世界\r\nline two", codec)) == [(1, "Grüße, 世界\r\nline two")]
    assert _clean("d/a.txt", _wide("Grüße\r\n", codec))["text"] == ["Grüße"]


@pytest.mark.parametrize("codec", WIDE)
def test_json_lines_in_utf16_or_utf32_keep_their_lines(codec):
    """Was a bad record per line (the first 'not valid UTF-8', the rest 'malformed JSON')."""
    raw = _wide('{"text": "één"}\n\n{"text": "two"}\n', codec)
    assert _docs("d/a.jsonl", raw) == [(1, "één"), (3, "two")]
    assert _docs("d/a.jsonl.gz", gzip.compress(raw)) == [(1, "één"), (3, "two")]
    assert list(json_lines("d/a.jsonl", raw)) == [(1, {"text": "één"}), (3, {"text": "two"})]  # SFT, DPO, eval


def test_a_mark_the_bytes_after_do_not_honour_is_one_bad_record_naming_the_file():
    raw = codecs.BOM_UTF16_LE + "ok".encode("utf-16-le") + b"\x00\xdc"  # a lone low surrogate
    assert _docs("d/a.txt", raw) == [(1, "d/a.txt: begins with a UTF-16 byte order mark but is not valid UTF-16 "
                                         "(at byte offset 6)")]
    (line, err), = _docs("d/a.jsonl", raw)
    assert line == 0 and err.startswith("d/a.jsonl: begins with a UTF-16 byte order mark")


def test_utf8_with_its_mark_latin1_and_nul_bytes_read_as_before():
    assert _docs("d/a.txt", codecs.BOM_UTF8 + b"words") == [(1, "words")]  # the mark dropped, not trained on
    assert _docs("d/a.txt", "café".encode("latin-1")) == [(1, "d/a.txt: not valid UTF-8 (byte 0xe9 at offset 3)")]
    assert _clean("d/a.txt", b"he\x00llo")["text"] == ["hello"]  # a control character, removed in cleaning
    assert _docs("d/a.jsonl", b'{"text": "a\xffb"}\n{"text": "ok"}\n') == [
        (1, "d/a.jsonl:1: not valid UTF-8 (byte 0xff at offset 11)"), (2, "ok")]


def test_line_endings_and_a_missing_last_newline():
    assert _clean("d/a.txt", b"one\r\ntwo\r\n")["text"] == ["one\ntwo"]
    assert _docs("d/a.jsonl", b'{"text": "a"}\r\n{"text": "b"}') == [(1, "a"), (2, "b")]
    assert _docs("d/a.jsonl", b'{"text": "a"}\n\n\n') == [(1, "a")]  # trailing blank lines are no records


# --------------------------------------------------------------------------- empty files


def test_an_empty_text_file_is_an_empty_shard_like_any_other_empty_file():
    """An empty .txt file was one document, dropped by the length filter, counted as a drop
    and never as the bad record the README says an empty file is."""
    no_rows = _parquet(pa.table({"text": pa.array([], pa.string())}))
    for path, raw in (("d/a.txt", b""), ("d/a.txt", codecs.BOM_UTF8), ("d/a.jsonl", b""),
                      ("d/a.jsonl.gz", gzip.compress(b"")), ("d/a.parquet", no_rows)):
        assert _clean(path, raw) == {"text": [""], "error": [f"{path}: empty shard (no documents)"], "dropped": [""],
                                     "line": [0]}, path
    # Blank lines are a document still (dropped as too short), as before.
    assert _clean("d/a.txt", b" \n\t\n")["dropped"] == ["too_short"]


# --------------------------------------------------------------------------- jsonl records


def test_a_text_field_named_twice_is_a_bad_record():
    """json.loads keeps the last of repeated names: one of the two texts was lost unsaid."""
    raw = (b'{"text": "first", "id": 1, "text": "second"}\n'
           b'{"text": "quotes \\"text\\" and \\"text\\"", "meta": {"text": 1}}\n'  # the name inside the text
           b'{"meta": {"text": 1, "text": 2}, "text": "ok"}\n'  # repeated in a nested object: not the record's
           b'{"id": 1, "id": 2, "text": "other names repeat as before"}\n')
    assert _docs("d/a.jsonl", raw) == [(1, "d/a.jsonl:1: field 'text' appears 2 times in one record"),
                                       (2, 'quotes "text" and "text"'), (3, "ok"), (4, "other names repeat as before")]
    assert _docs("d/a.jsonl", b'{"body": "a", "body": "b"}\n', field="body") == [
        (1, "d/a.jsonl:1: field 'body' appears 2 times in one record")]
    assert _docs("d/a.jsonl", '{"tëxt": "a", "tëxt": "b"}\n'.encode(), field="tëxt") == [
        (1, "d/a.jsonl:1: field 'tëxt' appears 2 times in one record")]


def test_a_text_field_named_twice_once_escaped_is_a_bad_record():
    """`"te\\u0078t"` is the name "text" too: json.loads kept the second text without a word."""
    raw = (b'{"text": "first", "te\\u0078t": "second"}\n'
           b'{"text": "caf\\u00e9, named once", "id": "\\u0041"}\n')  # escapes, the name once: a document
    assert _docs("d/a.jsonl", raw) == [(1, "d/a.jsonl:1: field 'text' appears 2 times in one record"),
                                       (2, "café, named once")]
    assert _docs("d/a.jsonl", b'{"t\\u00ebxt": "a", "t\\u00ebxt": "b"}\n', field="tëxt") == [
        (1, "d/a.jsonl:1: field 'tëxt' appears 2 times in one record")]


def test_records_that_are_not_an_object_with_a_string_text_field():
    raw = b'[1]\n3\n{"text": null}\n{"text": 3}\n{"text": ["a"]}\n{"body": "x"}\n'
    assert [e for _, e in _docs("d/a.jsonl", raw)] == [
        "d/a.jsonl:1: a JSON list, not an object with a 'text' field",
        "d/a.jsonl:2: a JSON int, not an object with a 'text' field",
        "d/a.jsonl:3: field 'text' is NoneType, not a string",
        "d/a.jsonl:4: field 'text' is int, not a string",
        "d/a.jsonl:5: field 'text' is list, not a string",
        "d/a.jsonl:6: no field 'text' (found: body); set data.text_field"]
    assert _docs("d/a.jsonl", b'{"body": "x"}\n', field="body") == [(1, "x")]


# --------------------------------------------------------------------------- gzip


def test_gzip_members_damage_and_files_that_are_not_gzip():
    one, two = gzip.compress(b'{"text": "a"}\n'), gzip.compress(b'{"text": "b"}\n')
    assert _docs("d/a.jsonl.gz", one + two) == [(1, "a"), (2, "b")]  # every member read
    crc = bytearray(one)
    crc[-8] ^= 0xFF
    for raw, why in ((bytes(crc), "CRC check failed"), (b'{"text": "a"}\n', "Not a gzipped file"),
                     (one[:-5], "Compressed file ended before the end-of-stream marker was reached")):
        (line, err), = _docs("d/a.jsonl.gz", raw)
        assert line == 0 and err.startswith("d/a.jsonl.gz: truncated or corrupt gzip (") and why in err, err


def test_files_joined_with_their_utf8_marks_read_every_line():
    """`cat` of JSON-lines files that each open with a byte order mark, or a gzip member of
    each: every mark after the first opened a line, a bad record ('Unexpected UTF-8 BOM')."""
    bom = codecs.BOM_UTF8
    raw = bom + b'{"text": "a"}\n' + bom + b'{"text": "b"}\n'
    assert _docs("d/a.jsonl", raw) == [(1, "a"), (2, "b")]
    members = gzip.compress(bom + b'{"text": "a"}\n') + gzip.compress(bom + b'{"text": "b"}\n')
    assert _docs("d/a.jsonl.gz", members) == [(1, "a"), (2, "b")]
    assert list(json_lines("d/a.jsonl", raw)) == [(1, {"text": "a"}), (2, {"text": "b"})]


# --------------------------------------------------------------------------- parquet


@pytest.mark.parametrize("type_", [pa.binary(), pa.large_binary(), pa.binary_view()])
def test_parquet_text_stored_as_bytes_is_read_as_utf8(type_):
    """Parquet's BYTE_ARRAY without the UTF8 annotation (how some writers store strings) reads
    as bytes: every row of it was a bad record ("'text' is bytes, not a string")."""
    column = pa.array(["Grüße".encode(), None, b"ba\xffd", b"plain"], type_)
    assert _docs("d/a.parquet", _parquet(pa.table({"text": column}))) == [
        (1, "Grüße"), (2, "d/a.parquet: row 2: 'text' is NoneType, not a string"),
        (3, "d/a.parquet: row 3: 'text' is not valid UTF-8 (byte 0xff at offset 2)"), (4, "plain")]


def test_parquet_bytes_dictionary_encoded_are_read_as_utf8():
    column = pa.array([b"one", b"two", b"one"], pa.binary()).dictionary_encode()
    assert _docs("d/a.parquet", _parquet(pa.table({"text": column}))) == [(1, "one"), (2, "two"), (3, "one")]


@pytest.mark.parametrize("column", [pa.array(["a", "b", "a"], pa.large_string()),
                                    pa.array(["a", "b", "a"]).dictionary_encode(),
                                    pa.array(["a", "b", "a"], pa.string_view())])
def test_parquet_string_types_read_alike(column):
    assert _docs("d/a.parquet", _parquet(pa.table({"text": column}))) == [(1, "a"), (2, "b"), (3, "a")]


def test_parquet_row_groups_null_rows_and_files_that_are_not_parquet():
    rows = [f"row {i}" for i in range(10)]
    assert [d for _, d in _docs("d/a.parquet", _parquet(pa.table({"text": rows}), row_group_size=3))] == rows
    assert _docs("d/a.parquet", _parquet(pa.table({"text": ["a", None]}))) == [
        (1, "a"), (2, "d/a.parquet: row 2: 'text' is NoneType, not a string")]
    (line, err), = _docs("d/a.parquet", b"not parquet")
    assert line == 0 and err.startswith("d/a.parquet: truncated or corrupt parquet (")
    assert _docs("d/a.parquet", _parquet(pa.table({"body": ["a"], "id": [1]}))) == [
        (0, "d/a.parquet: no column 'text' (columns: body, id); set data.text_field")]


# --------------------------------------------------------------------------- through prepare


def test_prepare_reads_them_and_charges_the_bad_ones_to_the_budget(tmp_path):
    """The real entry, in this process: UTF-16 text and parquet bytes are trained on; an empty
    text file and a repeated text field are bad records, named, within data.max_bad_records
    and past it."""
    from raylm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"document {i}: " + "some words here " * 12}) for i in range(40)]
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "b.txt").write_bytes(_wide("A note saved by Notepad as Unicode text.", "utf-16"))
    (corpus / "c.parquet").write_bytes(_parquet(pa.table({"text": pa.array([b"stored as bytes", b"more"])})))
    (corpus / "d.txt").write_bytes(b"")
    (corpus / "e.jsonl").write_text('{"text": "one", "text": "two"}\n{"text": "fine"}\n')
    tok = train_tokenizer([(corpus / "a.jsonl").read_text()], str(tmp_path / "tok"), vocab_size=300)
    base = [f"data.path={corpus}", "data.seq_len=32", "data.dedup=none", "data.val_fraction=0.1"]

    cfg = load_config(overrides=[*base, "data.max_bad_records=2"]).data
    stats = prepare(cfg, tok, str(tmp_path / "out"), seed=0, log=lambda *_: None)["stats"]
    assert stats["bad_records"] == [f"{corpus}/d.txt: empty shard (no documents)",
                                    f"{corpus}/e.jsonl:1: field 'text' appears 2 times in one record"]
    assert stats["documents"] == 40 + 1 + 2 + 1

    strict = load_config(overrides=[*base, "data.max_bad_records=0"]).data
    with pytest.raises(DataError, match=rf"^{corpus}/d\.txt: empty shard \(no documents\)$"):
        prepare(strict, tok, str(tmp_path / "out2"), seed=0, log=lambda *_: None)
