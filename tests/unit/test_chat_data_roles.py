"""Chat records whose role is not a string, or whose message lists are a DPO record's prompt,
chosen or rejected: one bad record naming file, line and field, never a traceback."""

from __future__ import annotations

import json

import pytest

from raylm import synthetic as S
from raylm.chat_data import encode_file
from raylm.data import DataError
from raylm.tokenizer import train_tokenizer

U = {"role": "user", "content": "reverse: ab"}
A = {"role": "assistant", "content": "ba"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


def _errors(tok, kind, records):
    raw = "\n".join(json.dumps(r) for r in records).encode()
    out = encode_file({"path": ["d/c.jsonl"], "bytes": [raw]}, tok, kind, {"d/c.jsonl": 0}, 0.0)
    return list(out["error"])


@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_a_role_that_is_a_list_or_object_is_a_bad_record(tok, role):
    errors = _errors(tok, "sft", [{"messages": [U, A]}, {"messages": [{"role": role, "content": "x"}, A]}])
    assert errors[0] == ""
    assert errors[1] == f"d/c.jsonl:2: message 0 has role {role!r}; expected one of system, user, assistant"


def test_a_dpo_response_list_with_such_a_role_is_a_bad_record(tok):
    bad = {"prompt": [U], "chosen": [{"role": ["assistant"], "content": "ba"}], "rejected": [A]}
    (error,) = _errors(tok, "dpo", [bad])
    assert error.startswith("d/c.jsonl:1: 'chosen' message 0 has role ['assistant']")


@pytest.mark.parametrize("field, record, expected", [
    ("prompt", {"prompt": ["hi"], "chosen": "a", "rejected": "b"}, "'prompt' message 0 is a str"),
    ("chosen", {"prompt": [U], "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"},
     "'chosen' message 0: field 'content' must be a non-empty string"),
    ("rejected", {"prompt": [U], "chosen": "a", "rejected": [{"role": "robot", "content": "b"}]},
     "'rejected' message 0 has role 'robot'"),
])
def test_a_dpo_record_names_the_list_its_bad_message_is_in(tok, field, record, expected):
    (error,) = _errors(tok, "dpo", [record])
    assert error.startswith(f"d/c.jsonl:1: {expected}")


def test_the_chat_template_refuses_an_unhashable_role_in_one_line(tok):
    with pytest.raises(DataError, match=r"^chat message 0 has role \['user'\]; expected one of"):
        tok.encode_chat([{"role": ["user"], "content": "hi"}])


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": {"text": "hi"}}, A]},
     "d/c.jsonl:1: message 0: field 'content' must be a non-empty string (got dict {'text': 'hi'})"),
    ({"messages": {"role": "user", "content": "hi"}}, "d/c.jsonl:1: 'messages' must be a non-empty list (got dict)"),
])
def test_a_json_object_where_text_or_a_list_belongs_is_named_a_dict(tok, record, expected):
    assert _errors(tok, "sft", [record]) == [expected]
