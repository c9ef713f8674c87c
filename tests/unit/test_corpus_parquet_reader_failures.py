"""Reading a parquet file: running out of memory is not a damaged file, and a damaged footer
is one bad record naming the file."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import raylm.documents as documents
from raylm.documents import parse_documents


def _parquet(texts) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue()


def test_memory_error_is_not_reported_as_a_corrupt_file(monkeypatch):
    """The defect: every exception from the parquet reader became "truncated or corrupt
    parquet", a bad record, MemoryError (pyarrow's ArrowMemoryError) included: a sound file
    read on a machine short of memory was skipped as damaged under data.max_bad_records, its
    documents lost, and the error named the wrong cause otherwise."""
    raw = _parquet(["a sound document"])

    def out_of_memory(*args, **kwargs):
        raise pa.ArrowMemoryError("malloc of size 1048576 failed")

    monkeypatch.setattr(documents.pq, "read_table", out_of_memory)
    with pytest.raises(MemoryError):
        list(parse_documents("corpus/part-0.parquet", raw, "text"))


def test_a_damaged_file_is_still_one_bad_record_naming_it():
    raw = _parquet(["x"] * 100)
    (line, err), = list(parse_documents("corpus/part-0.parquet", raw[: len(raw) // 2], "text"))
    assert line == 0 and "corpus/part-0.parquet: truncated or corrupt parquet" in str(err)


def test_a_column_name_that_is_not_utf8_is_one_bad_record_naming_the_file():
    """The defect: a parquet file whose footer names a column in bytes that are not UTF-8 (a
    damaged footer, or a writer that ignored the format's UTF-8 rule) read without a word, and
    the first look at its column names raised a bare UnicodeDecodeError out of the whole run,
    naming no file, where a damaged file is one bad record that names it."""
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": ["a doc"], "zzzz": [1]}), sink, store_schema=False)
    raw = sink.getvalue()
    assert raw.count(b"zzzz") >= 1
    raw = raw.replace(b"zzzz", b"zz\xff\xfe")  # same length: the footer stays readable
    (line, err), = list(parse_documents("corpus/part-1.parquet", raw, "text"))
    assert line == 0 and str(err).startswith("corpus/part-1.parquet: truncated or corrupt parquet")
