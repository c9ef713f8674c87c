"""SFT and DPO record files read as the corpus readers read theirs: parquet text stored as
bytes (top level, dictionary-encoded, or inside a `messages` list of structs), a string column
that is not UTF-8 a bad record naming its row (an unread extra column not at all), a JSON
record naming a field, or a message's role or content, twice a bad record naming file and
line; OpenAI's content parts and `developer` role, and TRL's conversational DPO forms, read.
Each file goes through `encode_file`, the stage `prepare_chat` runs on Ray Data, without Ray."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm import synthetic as S
from raylm.chat_data import KIND_ROWS, conversation, dataset_key, encode_file
from raylm.config import DataConfig
from raylm.data import DataError
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


def _encode(tok, path: str, raw: bytes, kind: str) -> list[tuple[int, str, str]]:
    """(line, error, seqs) for each record of one file, through prepare_chat's stage."""
    out = encode_file({"path": [path], "bytes": [raw]}, tok, kind, {path: 0}, 0.0)
    return [(int(n), e, s) for n, e, s in zip(out["line"], out["error"], out["seqs"])]


def _parquet(columns: dict) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


def _same_rows(tok, path, raw, kind, records):
    """`raw` encodes as these records do as JSON lines."""
    got = _encode(tok, path, raw, kind)
    want = _encode(tok, "w.jsonl", "\n".join(json.dumps(r) for r in records).encode(), kind)
    assert [(n, e) for n, e, _ in got] == [(n, "") for n, _, _ in want], got
    assert [s for _, _, s in got] == [s for _, _, s in want]


@pytest.mark.parametrize("typ", ["binary", "large_binary", "dictionary"])
def test_parquet_text_stored_as_bytes_is_read_as_utf8(tok, typ):
    def col(values):
        arr = pa.array(values, pa.binary())
        return arr.dictionary_encode() if typ == "dictionary" else arr.cast(getattr(pa, typ)())

    raw = _parquet({"prompt": col(["add: 2 + 3".encode(), "héllo".encode()]), "completion": col([b"5", b"hi"]),
                    "id": [1, 2]})
    _same_rows(tok, "d/s.parquet", raw, "sft", [{"prompt": "add: 2 + 3", "completion": "5"},
                                                {"prompt": "héllo", "completion": "hi"}])
    raw = _parquet({"prompt": col([b"reverse: ab"]), "chosen": col([b"ba"]), "rejected": col([b"ab"])})
    _same_rows(tok, "d/p.parquet", raw, "dpo", [{"prompt": "reverse: ab", "chosen": "ba", "rejected": "ab"}])


def test_parquet_messages_of_binary_structs_are_read_and_bad_bytes_name_their_row(tok):
    st = pa.struct([("role", pa.binary()), ("content", pa.large_binary())])
    msgs = [[{"role": b"user", "content": b"hi"}, {"role": b"assistant", "content": b"hello"}],
            [{"role": b"user", "content": b"q"}, {"role": b"assistant", "content": b"\xffx"}],
            None]
    raw = _parquet({"messages": pa.array(msgs, pa.list_(st)), "source": ["a", "b", "c"]})
    got = _encode(tok, "d/m.parquet", raw, "sft")
    assert got[0][1] == ""
    assert got[1][1] == "d/m.parquet: row 2: 'messages' is not valid UTF-8 (byte 0xff at offset 0)"
    assert got[2][1].startswith("d/m.parquet:3: expected 'messages' or 'prompt' and 'completion'")
    want = _encode(tok, "w.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}).encode(), "sft")
    assert got[0][2] == want[0][2]


def _not_utf8_strings() -> pa.Array:
    """A string column holding b"\\xff\\xfe" in its second row (parquet does not check)."""
    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0]))
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfe")])


def test_a_string_column_that_is_not_utf8_is_a_bad_record_not_a_crash(tok):
    raw = _parquet({"prompt": _not_utf8_strings(), "completion": ["a", "b"]})
    got = _encode(tok, "d/u.parquet", raw, "sft")
    assert [(n, e) for n, e, _ in got] == [
        (1, ""), (2, "d/u.parquet: row 2: 'prompt' is not valid UTF-8 (byte 0xff at offset 0)")]
    # A column the records are not read from is not read at all.
    raw = _parquet({"prompt": ["p", "q"], "completion": ["a", "b"], "notes": _not_utf8_strings()})
    assert [e for _, e, _ in _encode(tok, "d/x.parquet", raw, "sft")] == ["", ""]


DUPLICATES = {
    "prompt": ('{"prompt": "add: 1 + 1", "prompt": "add: 2 + 2", "completion": "4"}', "sft", "field 'prompt'"),
    "escaped": ('{"prompt": "add: 1 + 1", "\\u0070rompt": "add: 2 + 2", "completion": "4"}', "sft",
                "field 'prompt'"),
    "content": ('{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", '
                '"content": "c"}]}', "sft", "'messages' message 0: key 'content'"),
    "role": ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "role": "assistant", '
             '"content": "c"}]}', "sft", "'messages' message 1: key 'role'"),
    "part text": ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "text": "b"}]}, '
                  '{"role": "assistant", "content": "c"}]}', "sft", "'messages' message 0 content part 0: key 'text'"),
    "chosen": ('{"prompt": "q", "chosen": "a", "rejected": "b", "chosen": "b2"}', "dpo", "field 'chosen'"),
    "messages": ('{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "user", "content": "b"}], '
                 '"chosen": "x", "rejected": "y"}', "dpo", "field 'messages'"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_a_json_record_naming_a_field_twice_is_a_bad_record(tok, case):
    line, kind, what = DUPLICATES[case]
    good = json.dumps({"prompt": "q", "completion": "a"} if kind == "sft" else
                      {"prompt": "q", "chosen": "a", "rejected": "b"})
    got = _encode(tok, "d/r.jsonl", f"{good}\n{line}\n".encode(), kind)
    assert [n for n, _, _ in got] == [1, 2] and got[0][1] == ""
    assert got[1][1] == (f"d/r.jsonl:2: {what} appears more than once in one record (JSON keeps the last "
                         f"silently: which one is meant is unknown)")


def test_a_repeated_key_outside_what_is_read_is_not_a_bad_record(tok):
    line = '{"id": 1, "id": 2, "meta": {"prompt": 1, "prompt": 2}, "prompt": "q", "completion": "a"}'
    assert [e for _, e, _ in _encode(tok, "d/r.jsonl", line.encode(), "sft")] == [""]
    # A UTF-16 file, and a mark mid-file, are checked on the lines json_lines reads.
    text = '{"prompt": "a", "prompt": "b", "completion": "c"}\n'
    got = _encode(tok, "d/w.jsonl", ("\ufeff" + text).encode("utf-16-le"), "sft")
    assert "field 'prompt' appears more than once" in got[0][1]
    got = _encode(tok, "d/w.jsonl", b'{"prompt": "a", "completion": "c"}\n\xef\xbb\xbf' + text.encode(), "sft")
    assert got[0][1] == "" and "d/w.jsonl:2: field 'prompt'" in got[1][1]


def test_content_parts_and_the_developer_role_read_as_serve_reads_them():
    parts = {"messages": [{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "reverse: "},
                                                       {"type": "text", "text": "ab"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "ba"}]}]}
    assert conversation(parts, "sft", "x") == [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "reverse: ab"},
                                               {"role": "assistant", "content": "ba"}]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                          {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"^d\.jsonl:3: message 0: content part 0 is 'image_url', not a text part"):
        conversation(image, "sft", "d.jsonl:3")
    for bad, expected in (({"messages": [{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
                           "message 0 has role 'tool'"),
                          ({"messages": json.dumps(parts["messages"])},
                           "'messages' must be a non-empty list (got str) (a JSON string of the list?")):
        with pytest.raises(DataError, match=r"^d\.jsonl:3: " + expected.replace("(", r"\(").replace(")", r"\)")
                           .replace("?", r"\?")):
            conversation(bad, "sft", "d.jsonl:3")


def test_trl_conversational_dpo_forms_are_the_pairs_they_mean(tok):
    plain = {"prompt": "reverse: ab", "chosen": "ba", "rejected": "ab"}
    user, good, bad = ({"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"},
                       {"role": "assistant", "content": "ab"})
    explicit = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    implicit = {"chosen": [user, good], "rejected": [user, bad]}
    for record in (explicit, implicit):
        assert conversation(record, "dpo", "x") == conversation(plain, "dpo", "x")
    raw = "\n".join(json.dumps(r) for r in (plain, explicit, implicit)).encode()
    got = _encode(tok, "d/p.jsonl", raw, "dpo")
    assert [e for _, e, _ in got] == ["", "", ""] and got[0][2] == got[1][2] == got[2][2]
    for record, expected in (
            ({"chosen": [user, good], "rejected": [{"role": "user", "content": "other"}, bad]},
             "with no 'prompt', 'chosen' and 'rejected' must be conversations that are the same up to"),
            ({"prompt": [user], "chosen": [good, good], "rejected": [bad]},
             "'chosen' as a list must be one assistant message"),
            ({"prompt": [user, good], "chosen": "a", "rejected": "b"}, "'prompt' must end with a user message"),
            ({"chosen": "q a", "rejected": "q b"}, "field 'prompt' must be a non-empty string (got missing)")):
        with pytest.raises(DataError, match="^y:1: " + expected.replace("(", r"\(").replace(")", r"\)")):
            conversation(record, "dpo", "y:1")


def test_the_row_rules_changed_so_older_prepared_data_is_not_reused():
    """The records above give other rows than before: datasets of both kinds prepared before
    are prepared again (their keys name the row rules)."""
    assert KIND_ROWS == {"sft": 2, "dpo": 3}
    cfg = DataConfig(path="x")
    assert dataset_key("sft", [], cfg, "t", 0) != dataset_key("dpo", [], cfg, "t", 0)


def test_trl_conversational_pairs_in_parquet_as_hub_datasets_store_them(tok):
    """Hub preference sets (TRL's) store chosen and rejected as lists of {content, role} structs."""
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    convs = {"chosen": [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: ab"},
                         {"role": "assistant", "content": "ba"}]],
             "rejected": [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: ab"},
                           {"role": "assistant", "content": "ab"}]]}
    raw = _parquet({k: pa.array(v, pa.list_(msg)) for k, v in convs.items()} | {"score_chosen": [9.0]})
    plain = {"messages": convs["chosen"][0][:2], "chosen": "ba", "rejected": "ab"}
    _same_rows(tok, "d/pairs.parquet", raw, "dpo", [plain])


def test_a_parquet_file_with_no_record_column_is_one_bad_record_naming_its_columns(tok):
    raw = _parquet({"text": ["a", "b", "c"]})
    assert [(n, e) for n, e, _ in _encode(tok, "d/t.parquet", raw, "sft")] == [
        (0, "d/t.parquet: no column 'messages', 'prompt', 'completion', 'chosen', 'rejected' (columns: text)")]
