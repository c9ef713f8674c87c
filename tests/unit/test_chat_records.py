"""SFT/DPO records as they come from real files: DPO's loss mask over a multi-turn prompt,
parquet rows with nulls and non-JSON columns, and lone surrogate escapes, each a clean
record or a bad record naming file, line and field (never a traceback)."""

from __future__ import annotations

import datetime
import decimal
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylm import synthetic as S
from raylm.chat_data import conversation, encode_file, encode_record, split_text
from raylm.data import DataError
from raylm.documents import stable_fraction
from raylm.objectives import dpo_batch
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


MULTI_TURN = {"messages": [{"role": "user", "content": "word after cat: dog cat fox"},
                           {"role": "assistant", "content": "fox and a long earlier reply here"},
                           {"role": "user", "content": "reverse: abc"}], "chosen": "cba", "rejected": "abc"}


def _targets(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_dpo_mask_covers_the_response_alone_not_earlier_assistant_turns(tok):
    (c, cm), (r, rm) = encode_record(tok, MULTI_TURN, "dpo", "x")
    assert _targets(tok, c, cm) == "cba<|end|>" and _targets(tok, r, rm) == "abc<|end|>"
    prompt = tok.encode_chat(MULTI_TURN["messages"], add_generation_prompt=True)[0]
    assert c[:len(prompt)] == r[:len(prompt)] == prompt and not any(cm[:len(prompt)])
    # The in-memory batch builder agrees with the prepared rows.
    batch = dpo_batch(tok, [{"prompt": MULTI_TURN["messages"], "chosen": "cba", "rejected": "abc"}])
    assert batch["chosen_mask"][0, :len(cm)].tolist() == cm and batch["rejected_mask"][0, :len(rm)].tolist() == rm


@pytest.mark.parametrize("last", ["assistant", "system"])
def test_dpo_messages_must_end_with_a_user_turn(last):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": last, "content": "a"}],
              "chosen": "x", "rejected": "y"}
    with pytest.raises(DataError, match=rf"^d/p\.jsonl:4: 'messages' must end with a user message.*'{last}'"):
        conversation(record, "dpo", "d/p.jsonl:4")


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_parquet_with_non_json_columns_encodes_and_splits_by_the_conversation(tok):
    records = [{"prompt": "add: 2 + 3", "completion": "5"}, {"prompt": "reverse: ab", "completion": "ba"}]
    extra = {"ts": pa.array([datetime.datetime(2024, 1, 1)] * 2, pa.timestamp("us")),
             "day": pa.array([datetime.date(2024, 1, 2)] * 2), "blob": pa.array([b"\x00\xff"] * 2),
             "price": pa.array([decimal.Decimal("1.50")] * 2, pa.decimal128(5, 2))}
    table = pa.table({"prompt": [r["prompt"] for r in records], "completion": [r["completion"] for r in records],
                      **extra})
    out = encode_file({"path": ["d/x.parquet"], "bytes": [_parquet(table)]}, tok, "sft", {"d/x.parquet": 0}, 0.5)
    assert list(out["error"]) == ["", ""] and all(out["seqs"])
    # The split hashes the conversation alone, so the columns beside it do not move a record:
    # the same records without them land where they do.
    lines = "\n".join(json.dumps(r) for r in records).encode()
    plain = encode_file({"path": ["d/x.jsonl"], "bytes": [lines]}, tok, "sft", {"d/x.jsonl": 0}, 0.5)
    convs = [conversation(r, "sft", "x") for r in records]
    assert list(plain["val"]) == list(out["val"]) == [stable_fraction(split_text(c, "sft")) < 0.5 for c in convs]


@pytest.mark.parametrize("record, field", [
    ({"prompt": "bad \ud800", "completion": "a"}, "field 'prompt'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x\udfff"}]},
     "message 1: field 'content'"),
])
def test_lone_surrogate_is_a_bad_record_naming_file_line_and_field(tok, record, field):
    lines = json.dumps({"prompt": "add: 2 + 3", "completion": "5"}) + "\n" + json.dumps(record)
    out = encode_file({"path": ["d/s.jsonl"], "bytes": [lines.encode()]}, tok, "sft", {"d/s.jsonl": 0}, 0.0)
    assert out["error"][0] == ""
    assert out["error"][1].startswith(f"d/s.jsonl:2: {field} holds a lone UTF-16 surrogate")
    with pytest.raises(DataError, match="'rejected' holds a lone UTF-16 surrogate"):
        conversation({"prompt": "q", "chosen": "a", "rejected": "\ud800"}, "dpo", "d/p.jsonl:1")


def test_null_parquet_fields_count_as_absent(tok):
    msgs = [{"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"}]
    sft = pa.table({"messages": [msgs, None], "prompt": [None, "add: 2 + 3"], "completion": [None, "5"]})
    out = encode_file({"path": ["d/s.parquet"], "bytes": [_parquet(sft)]}, tok, "sft", {"d/s.parquet": 0}, 0.0)
    assert list(out["error"]) == ["", ""]
    assert json.loads(out["seqs"][1]) == [list(x) for x in encode_record(tok, {"prompt": "add: 2 + 3",
                                                                               "completion": "5"}, "sft", "x")]
    dpo = pa.table({"messages": [None, msgs[:1]], "prompt": ["reverse: ab", None], "chosen": ["ba", "ba"],
                    "rejected": ["ab", "ab"]})
    out = encode_file({"path": ["d/p.parquet"], "bytes": [_parquet(dpo)]}, tok, "dpo", {"d/p.parquet": 0}, 0.0)
    assert list(out["error"]) == ["", ""] and out["seqs"][0] == out["seqs"][1]
    with pytest.raises(DataError, match=r"^d/n\.parquet:3: expected 'messages' or 'prompt' and 'completion' "
                                        r"\(found: id\)"):
        conversation({"messages": None, "prompt": None, "completion": None, "id": 7}, "sft", "d/n.parquet:3")
    with pytest.raises(DataError, match="field 'completion' must be a non-empty string \\(got missing\\)"):
        conversation({"messages": None, "prompt": "q", "completion": None}, "sft", "d/n.parquet:4")


def test_dpo_batch_of_a_plain_prompt_is_unchanged(tok):
    """A one-message prompt masked the response alone before; it still does."""
    batch = dpo_batch(tok, [{"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc"}])
    ids, mask = tok.encode_chat([{"role": "user", "content": "reverse: abc"},
                                 {"role": "assistant", "content": "cba"}])
    assert batch["chosen"][0, :len(ids)].tolist() == ids
    assert torch.equal(batch["chosen_mask"][0, :len(mask)], torch.tensor(mask))
