"""Pure data functions: packing, shuffling, cleaning, hashing, parsing and its error messages."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import DataConfig
from raylm.documents import clean_text, parse_and_clean, parse_documents, stable_fraction
from raylm.errors import DataError
from raylm.packing import BlockPacker, ShuffleBuffer, _row_sets

EOS = 0


def _flat(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.array([t for d in docs for t in d], dtype=np.int32)
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return flat, offsets


# --------------------------------------------------------------------------- BlockPacker


def test_packer_inserts_eos_after_every_document():
    p = BlockPacker(block_len=4, eos_id=EOS)
    blocks = p.add(*_flat([[1, 2, 3], [4], [5, 6]]))
    # 1 2 3 E | 4 E 5 6 | E (remainder)
    assert blocks.tolist() == [[1, 2, 3, EOS], [4, EOS, 5, 6]]
    assert p.buf.tolist() == [EOS]


def test_packer_empty_document_is_just_eos():
    p = BlockPacker(block_len=3, eos_id=EOS)
    assert p.add(*_flat([[7], [], [8]])).tolist() == [[7, EOS, EOS]]
    assert p.buf.tolist() == [8, EOS]


def test_packer_no_documents():
    p = BlockPacker(block_len=3, eos_id=EOS)
    out = p.add(np.empty(0, dtype=np.int32), np.zeros(1, dtype=np.int32))
    assert out.shape == (0, 3) and len(p.buf) == 0


def test_packer_carries_remainder_and_concatenation_equals_docs_joined():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=int(rng.integers(0, 23))).tolist() for _ in range(60)]
    block_len = 7
    p = BlockPacker(block_len, EOS)
    emitted = []
    for i in range(0, len(docs), 9):  # several calls, so blocks straddle batches
        blocks = p.add(*_flat(docs[i:i + 9]))
        assert blocks.ndim == 2 and blocks.shape[1] == block_len
        assert blocks.dtype == np.int32
        assert len(p.buf) < block_len
        emitted.append(blocks)
    stream = np.concatenate([*(b.ravel() for b in emitted), p.buf]).tolist()
    expected = [t for d in docs for t in (*d, EOS)]
    assert stream == expected
    assert sum(len(b) for b in emitted) == len(expected) // block_len


def test_packer_sources_per_block():
    p = BlockPacker(block_len=4, eos_id=EOS)
    p.add(*_flat([[1, 2, 3], [4], [5, 6, 7, 8, 9]]), files=np.array([0, 2, 2]))
    # 1 2 3 E | 4 E 5 6 | 7 8 9 E
    assert p.last_sources == [(0,), (2,), (2,)]
    p.add(*_flat([[1], [2, 3, 4, 5, 6, 7]]), files=np.array([3, 5]))
    assert p.last_sources == [(3, 5), (5,)]  # 1 E 2 3 | 4 5 6 7


def test_row_sets_equal_unique_per_row():
    rows = np.random.default_rng(0).integers(0, 4, size=(300, 9))
    rows[::3] = 7  # many single-valued rows, the common case
    assert _row_sets(rows) == [tuple(np.unique(r).tolist()) for r in rows]


# --------------------------------------------------------------------------- ShuffleBuffer


def _shuffle(items: np.ndarray, window: int, seed: int, chunk: int = 5) -> list[int]:
    buf, out = ShuffleBuffer(window, seed), []
    for i in range(0, len(items), chunk):
        out.extend(int(b[0]) for b in buf.push(items[i:i + chunk]))
    out.extend(int(b[0]) for b in buf.drain())
    return out


def test_shuffle_is_a_permutation():
    items = np.arange(100).reshape(100, 1)
    out = _shuffle(items, window=16, seed=1)
    assert sorted(out) == list(range(100))
    assert out != list(range(100))


def test_shuffle_is_deterministic_per_seed_and_differs_across_seeds():
    items = np.arange(64).reshape(64, 1)
    a, b, c = _shuffle(items, 8, 3), _shuffle(items, 8, 3), _shuffle(items, 8, 4)
    assert a == b
    assert a != c
    # The order depends on input order and seed only, not on how the input is chunked.
    assert _shuffle(items, 8, 3, chunk=1) == a


def test_shuffle_is_independent_of_chunking_past_many_bulk_draws():
    items = np.arange(3 * ShuffleBuffer.DRAWS).reshape(-1, 1)
    a = _shuffle(items, 16, 5, chunk=7)
    assert a == _shuffle(items, 16, 5, chunk=1000) and sorted(a) == list(range(len(items)))


def test_shuffle_window_one_keeps_order():
    items = np.arange(10).reshape(10, 1)
    assert _shuffle(items, window=1, seed=0) == list(range(10))
    assert _shuffle(items, window=0, seed=0) == list(range(10))


# --------------------------------------------------------------------------- clean_text


@pytest.mark.parametrize("raw,clean", [
    ("cafe\u0301", "caf\u00e9"),  # NFC
    ("a\r\nb\rc", "a\nb\nc"),  # CRLF and lone CR
    ("a\x00b\x07c\x1bd\x7fe", "abcde"),  # control characters
    ("a\u00a0b\u2009c\u3000d", "a b c d"),  # NBSP and other odd spaces
    ("line  \t\nnext", "line\nnext"),  # trailing spaces
    ("a\n\n\n\nb", "a\n\nb"),  # 3+ blank lines collapsed
    ("a\n  \n\t\n \n\nb", "a\n\nb"),  # whitespace-only lines count as blank
    ("a\n\nb", "a\n\nb"),  # one blank line kept
    ("\n\nbody\n\n", "body"),  # surrounding newlines stripped
    ("def f():\n    return 1\n\tx", "def f():\n    return 1\n\tx"),  # indentation kept
    ("    indented first line", "    indented first line"),
    ("tab\tinside", "tab\tinside"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_idempotent():
    s = "x\u00a0 \r\n\r\n\r\n\r\n  y\x00\n"
    assert clean_text(clean_text(s)) == clean_text(s)


# --------------------------------------------------------------------------- stable_fraction


def test_stable_fraction_deterministic_and_in_unit_interval():
    texts = [f"document {i}" for i in range(2000)] + ["", "ünïcödé"]
    fr = [stable_fraction(t) for t in texts]
    assert fr == [stable_fraction(t) for t in texts]
    assert all(0.0 <= f < 1.0 for f in fr)
    assert len(set(fr)) == len(fr)
    # Roughly uniform: about 2% land under 0.02.
    assert 10 < sum(f < 0.02 for f in fr) < 80


# --------------------------------------------------------------------------- parse_documents


def _parse(path: str, raw: bytes, field: str = "text"):
    return list(parse_documents(path, raw, field))


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_jsonl_documents_with_line_numbers():
    raw = b'{"text": "one"}\n\n{"text": "two", "id": 3}\r\n'
    assert _parse("d/a.jsonl", raw) == [(1, "one"), (3, "two")]


def test_jsonl_custom_field():
    assert _parse("a.jsonl", b'{"body": "x"}\n', "body") == [(1, "x")]


def test_malformed_json_names_file_and_line():
    raw = b'{"text": "ok"}\n{"text": broken}\n{"text": "after"}\n'
    out = _parse("s3://b/c/a.jsonl", raw)
    assert out[0] == (1, "ok") and out[2] == (3, "after")  # a bad record does not stop parsing
    line, err = out[1]
    assert line == 2 and isinstance(err, DataError)
    assert "s3://b/c/a.jsonl:2" in str(err) and "malformed JSON" in str(err)


def test_missing_field_names_field_and_found_keys():
    (line, err), = _parse("a.jsonl", b'{"content": "x", "id": 1}\n')
    assert isinstance(err, DataError)
    msg = str(err)
    assert "a.jsonl:1" in msg and "'text'" in msg and "content, id" in msg and "data.text_field" in msg


def test_non_object_record():
    (_, err), = _parse("a.jsonl", b'["text"]\n')
    assert isinstance(err, DataError) and "a.jsonl:1" in str(err) and "list" in str(err)


def test_non_string_field():
    (_, err), = _parse("a.jsonl", b'{"text": 5}\n')
    assert isinstance(err, DataError) and "a.jsonl:1" in str(err) and "int, not a string" in str(err)
    (_, err), = _parse("a.jsonl", b'{"text": null}\n')
    assert isinstance(err, DataError) and "NoneType" in str(err)


def test_invalid_utf8_names_file_and_line():
    raw = b'{"text": "fine"}\n{"text": "bad \xff byte"}\n'
    out = _parse("a.jsonl", raw)
    assert out[0] == (1, "fine")
    line, err = out[1]
    assert line == 2 and isinstance(err, DataError)
    assert "a.jsonl:2" in str(err) and "UTF-8" in str(err) and "0xff" in str(err)


def test_jsonl_gz():
    raw = gzip.compress(b'{"text": "a"}\n{"text": "b"}\n')
    assert _parse("x.jsonl.gz", raw) == [(1, "a"), (2, "b")]


@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "crc"])
def test_corrupt_gzip_is_a_data_error(damage):
    good = gzip.compress(b'{"text": "hello"}\n' * 20)
    raw = {"truncated": good[:-12], "not_gzip": b"plain bytes",
           "crc": good[:-8] + bytes(8)}[damage]
    (line, err), = _parse("x.jsonl.gz", raw)
    assert line == 0 and isinstance(err, DataError)
    assert "x.jsonl.gz" in str(err) and "gzip" in str(err)


def test_corrupt_gzip_deflate_stream_is_a_data_error():
    bad = bytearray(gzip.compress(b'{"text": "hello"}\n' * 20))
    bad[10] = 0xFF  # first deflate block header: reserved block type
    (line, err), = _parse("x.jsonl.gz", bytes(bad))
    assert line == 0 and isinstance(err, DataError) and "x.jsonl.gz" in str(err)


def test_txt_is_one_document():
    assert _parse("dir/a.txt", b"line one\nline two\n\n{not json}") == [(1, "line one\nline two\n\n{not json}")]


def test_txt_invalid_utf8():
    (line, err), = _parse("dir/a.txt", b"ok \xc3\x28")
    assert line == 1 and isinstance(err, DataError) and "dir/a.txt" in str(err) and "UTF-8" in str(err)


def test_parquet_documents():
    raw = _parquet(pa.table({"text": ["a", None, "c"], "id": [1, 2, 3]}))
    out = _parse("p/x.parquet", raw)
    assert out[0] == (1, "a") and out[2] == (3, "c")
    line, err = out[1]
    assert line == 2 and isinstance(err, DataError) and "row 2" in str(err) and "p/x.parquet" in str(err)


def test_corrupt_parquet_bytes():
    raw = _parquet(pa.table({"text": ["a"] * 100}))
    for bad in (raw[: len(raw) // 2], b"PAR1 garbage"):
        (line, err), = _parse("p/x.parquet", bad)
        assert line == 0 and isinstance(err, DataError)
        assert "p/x.parquet" in str(err) and "corrupt parquet" in str(err)


def test_parquet_missing_column():
    raw = _parquet(pa.table({"content": ["a"], "id": [1]}))
    (line, err), = _parse("x.parquet", raw)
    assert line == 0 and isinstance(err, DataError)
    assert "x.parquet" in str(err) and "'text'" in str(err) and "content, id" in str(err)


# --------------------------------------------------------------------------- parse_and_clean


def _batch(*files: tuple[str, bytes]) -> dict:
    return {"path": np.array([p for p, _ in files], dtype=object),
            "bytes": np.array([b for _, b in files], dtype=object)}


def test_parse_and_clean_rows():
    cfg = DataConfig(min_chars=3, max_chars=20, val_fraction=0.0)
    lines = [{"text": "hello  \r\nworld"}, {"text": "ab"}, {"text": "x" * 21}, {"nope": 1}]
    raw = "\n".join(json.dumps(r) for r in lines).encode()
    out = parse_and_clean(_batch(("a.jsonl", raw)), cfg)
    assert list(out["text"]) == ["hello\nworld", "", "", ""]
    assert list(out["dropped"]) == ["", "too_short", "too_long", ""]
    assert out["error"][3].startswith("a.jsonl:4: no field 'text'")
    assert list(out["error"][:3]) == ["", "", ""]
    assert list(out["line"]) == [1, 2, 3, 4]
    assert list(out["source"]) == ["a.jsonl"] * 4
    assert not out["val"].any()


def test_parse_and_clean_empty_shard_is_an_error():
    out = parse_and_clean(_batch(("e.jsonl", b"\n\n  \n"), ("ok.jsonl", b'{"text": "fine"}')), DataConfig())
    assert len(out["text"]) == 2
    assert out["error"][0] == "e.jsonl: empty shard (no documents)" and out["source"][0] == "e.jsonl"
    assert out["text"][1] == "fine" and out["error"][1] == ""


def test_parse_and_clean_whitespace_only_is_dropped_as_too_short():
    out = parse_and_clean(_batch(("a.txt", b"\n\n\n")), DataConfig())
    assert list(out["dropped"]) == ["too_short"] and out["text"][0] == ""


def test_parse_and_clean_val_split_is_by_text_hash():
    docs = [f"document number {i}" for i in range(200)]
    raw = "\n".join(json.dumps({"text": d}) for d in docs).encode()
    cfg = DataConfig(val_fraction=0.3)
    out = parse_and_clean(_batch(("a.jsonl", raw)), cfg)
    assert list(out["val"]) == [stable_fraction(d) < 0.3 for d in docs]
    assert 0 < out["val"].sum() < 200
    forced = parse_and_clean(_batch(("a.jsonl", raw)), cfg, val_files=frozenset({"a.jsonl"}))
    assert forced["val"].all()


def test_clean_text_strips_trailing_spaces_at_document_end():
    assert clean_text("abc   ") == "abc"
    assert clean_text("a\n   ") == "a"
    assert clean_text("  indented\n\tkept") == "  indented\n\tkept"
