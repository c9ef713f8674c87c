"""Parquet values that Python cannot hold (a date past year 9999, a duration past a C int of
days, a timestamp in a time zone no database names) in the text column, or in a chat file's
columns, are bad records naming their row, as a number or a null there is: they were a
traceback (OverflowError, UnknownTimeZoneError) out of the whole prepare."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.chat_data import parse_records
from raylm.config import DataConfig
from raylm.documents import parse_and_clean, parse_documents
from raylm.errors import DataError

FAR = 2**40  # seconds or days: far past what datetime, date and timedelta hold


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.mark.parametrize("column", [
    pa.array([0, FAR], pa.timestamp("s")),
    pa.array([0, 2**30], pa.date32()),
    pa.array([0, FAR * 2**20], pa.duration("s")),
], ids=["timestamp", "date", "duration"])
def test_a_value_python_cannot_hold_is_a_bad_record_of_its_row(column):
    docs = list(parse_documents("dir/x.parquet", _parquet(pa.table({"text": column})), "text"))
    assert [line for line, _ in docs] == [1, 2]
    assert all(isinstance(d, DataError) for _, d in docs)
    assert "row 1: 'text' is" in str(docs[0][1]) and "not a string" in str(docs[0][1])
    assert str(docs[1][1]).startswith("dir/x.parquet: row 2: 'text' ")
    assert str(column.type).split("[")[0] in str(docs[1][1])  # parquet keeps seconds as milliseconds


def test_a_timestamp_in_a_time_zone_no_database_names_is_a_bad_record_of_each_row():
    column = pa.array([0, 1], pa.timestamp("ms", tz="Mars/Olympus"))
    docs = list(parse_documents("x.parquet", _parquet(pa.table({"text": column})), "text"))
    assert [str(d) for _, d in docs] == [
        f"x.parquet: row {i}: 'text' holds a value of type timestamp[ms, tz=Mars/Olympus] that Python cannot "
        f"represent ('Mars/Olympus'), not text" for i in (1, 2)]


def test_the_stage_reports_them_as_errors_beside_good_files():
    batch = {"path": ["a.parquet", "b.jsonl"],
             "bytes": [_parquet(pa.table({"text": pa.array([FAR], pa.timestamp("s"))})), b'{"text": "hello there"}\n']}
    out = parse_and_clean(batch, DataConfig())
    assert list(out["text"]) == ["", "hello there"]
    assert out["error"][0].startswith("a.parquet: row 1: 'text' ") and out["error"][1] == ""


def test_a_chat_file_with_a_far_timestamp_in_one_row_keeps_its_other_rows():
    msg = pa.struct([("role", pa.string()), ("content", pa.string()), ("at", pa.timestamp("s"))])
    rows = [[{"role": "user", "content": "hi", "at": 0}, {"role": "assistant", "content": "hello", "at": 1}],
            [{"role": "user", "content": "hi", "at": FAR}, {"role": "assistant", "content": "yo", "at": 1}]]
    records = list(parse_records("chat.parquet", _parquet(pa.table({"messages": pa.array(rows, pa.list_(msg))}))))
    assert [line for line, _ in records] == [1, 2]
    assert isinstance(records[0][1], dict) and records[0][1]["messages"][1]["content"] == "hello"
    assert isinstance(records[1][1], DataError)
    assert str(records[1][1]).startswith("chat.parquet: row 2: 'messages' ")
