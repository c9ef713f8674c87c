"""SFT and DPO records: validation with file:line errors, the template's loss mask, packing
whole conversations, and packed rows training exactly like conversations alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raylm import synthetic as S
from raylm.chat_data import conversation, encode_file, encode_record, pack_conversations, parse_records
from raylm.config import ModelConfig
from raylm.data import DataError
from raylm.model import build_model
from raylm.objectives import SFTObjective
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


GOOD_SFT = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: abc"},
                  {"role": "assistant", "content": "cba"}]},
    {"prompt": "add: 2 + 3", "completion": "5"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"}]},
]

BAD_SFT = {
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    "empty content": ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
                      "'content' must be a non-empty string"),
    "messages not a list": ({"messages": "hello"}, "'messages' must be a non-empty list (got str)"),
    "message not an object": ({"messages": ["hello"]}, "message 0 is a str"),
    "no assistant": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    "no known fields": ({"text": "plain"}, "expected 'messages' or 'prompt' and 'completion' (found: text)"),
    "completion a number": ({"prompt": "q", "completion": 5}, "'completion' must be a non-empty string"),
    "not an object": ([1, 2], "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_SFT))
def test_bad_sft_records_name_file_line_and_problem(case):
    record, expected = BAD_SFT[case]
    with pytest.raises(DataError) as info:
        conversation(record, "sft", "data/chat.jsonl:7")
    assert str(info.value).startswith("data/chat.jsonl:7: ") and expected in str(info.value)


def test_bad_dpo_records():
    for record, expected in (({"prompt": "q", "chosen": "a"}, "'rejected' must be a non-empty string"),
                             ({"chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
                             ({"messages": [{"role": "user", "content": "q"}], "chosen": "", "rejected": "b"},
                              "'chosen' must be")):
        with pytest.raises(DataError, match=expected):
            conversation(record, "dpo", "p.jsonl:1")


def test_sft_encoding_masks_assistant_content_and_end_then_appends_eos(tok):
    [(ids, mask)] = encode_record(tok, GOOD_SFT[2], "sft", "x")
    assert ids[-1] == tok.eos_id and not mask[-1]
    ref_ids, ref_mask = tok.encode_chat(GOOD_SFT[2]["messages"])
    assert ids[:-1] == ref_ids and mask[:-1] == ref_mask
    target_text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "hello" in target_text and "ba" in target_text and "reverse" not in target_text
    assert sum(1 for i, m in zip(ids, mask) if m and i == tok.special_ids["<|end|>"]) == 2  # learns to stop


def test_dpo_encoding_shares_the_prompt(tok):
    (c, cm), (r, rm) = encode_record(tok, {"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc"}, "dpo", "x")
    prompt = tok.encode_chat([{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True)[0]
    assert c[:len(prompt)] == r[:len(prompt)] == prompt
    # The reply and its <|end|> are targets; the template's newline after it is not.
    assert not any(cm[:len(prompt)]) and all(cm[len(prompt):-1]) and all(rm[len(prompt):-1])
    assert not cm[-1] and not rm[-1]


def test_encode_file_reports_bad_lines_in_order(tok):
    lines = [json.dumps(GOOD_SFT[0]), "{not json", json.dumps({"messages": "x"}), "", json.dumps(GOOD_SFT[1])]
    out = encode_file({"path": ["d/a.jsonl"], "bytes": ["\n".join(lines).encode()]}, tok, "sft", {"d/a.jsonl": 0}, 0.0)
    assert list(out["line"]) == [1, 2, 3, 5]
    assert out["error"][0] == "" and out["error"][3] == ""
    assert out["error"][1].startswith("d/a.jsonl:2: malformed JSON")
    assert out["error"][2].startswith("d/a.jsonl:3: 'messages' must be a non-empty list")
    empty = encode_file({"path": ["d/e.jsonl"], "bytes": [b""]}, tok, "sft", {"d/e.jsonl": 0}, 0.0)
    assert empty["error"][0] == "d/e.jsonl: empty file (no records)"


def test_truncated_gzip_is_one_bad_record():
    [(line, err)] = list(parse_records("c.jsonl.gz", b"\x1f\x8b\x08\x00garbage"))
    assert isinstance(err, DataError) and "c.jsonl.gz: truncated or corrupt gzip" in str(err)


def test_corrupt_parquet_is_one_bad_record():
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["p"] * 50, "completion": ["c"] * 50}), sink)
    raw = sink.getvalue()
    for bad in (raw[: len(raw) // 2], b"PAR1 garbage"):
        [(line, err)] = list(parse_records("c/x.parquet", bad))
        assert line == 0 and isinstance(err, DataError)
        assert str(err).startswith("c/x.parquet: truncated or corrupt parquet (")


def test_packing_keeps_conversations_whole_and_pads():
    convs = [([1] * 5, [True] * 5), ([2] * 4, [False] * 4), ([3] * 6, [True] * 6), ([4] * 2, [True] * 2)]
    rows = list(pack_conversations(convs, width=10, pad_id=0))
    assert [r[0].tolist() for r in rows] == [[1] * 5 + [2] * 4 + [0], [3] * 6 + [4] * 2 + [0, 0]]
    assert [r[1].tolist() for r in rows] == [[1] * 5 + [0] * 5, [1] * 8 + [0, 0]]


def test_packed_rows_train_exactly_like_conversations_alone(tok):
    """The SFT loss (and its gradient) of a packed row with document masking equals the sum
    over its conversations trained one by one; without masking it does not."""
    records = [S.messages_record(e) for t in S.TASKS for e in S.examples(t, 2, seed=4)]
    convs = [encode_record(tok, r, "sft", "x")[0] for r in records]
    width = sum(len(ids) for ids, _ in convs) + 3
    [(ids, mask)] = list(pack_conversations(convs, width, tok.pad_id))
    model = build_model(ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
                        seed=0)
    packed = {"tokens": torch.as_tensor(ids)[None].long(), "loss_mask": torch.as_tensor(mask)[None].bool()}
    masked = SFTObjective(doc_sep=tok.eos_id, pad_id=tok.pad_id)
    alone = [{"tokens": torch.tensor([c_ids]), "loss_mask": torch.tensor([c_mask])} for c_ids, c_mask in convs]
    assert masked.count(packed) == sum(SFTObjective().count(a) for a in alone)
    assert masked.tokens(packed) == sum(len(c) for c, _ in convs)  # the pads are not work

    def grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_p, g_p = grads(lambda: masked.loss_sum(model, packed))
    loss_a, g_a = grads(lambda: sum(SFTObjective().loss_sum(model, a) for a in alone))
    torch.testing.assert_close(loss_p, loss_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_p, g_a):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        unmasked = SFTObjective(pad_id=tok.pad_id).loss_sum(model, packed)
    assert abs(float(unmasked) - float(loss_a)) > 1e-3  # cross-talk changes it: the check can fail


def test_masks_survive_the_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    from raylm.chat_data import rows_table

    rows = [{"tokens": np.arange(5, dtype=np.int32), "loss_mask": np.array([0, 1, 1, 0, 1], dtype=np.int8)}]
    pq.write_table(rows_table(rows, 5), tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    assert back.column("loss_mask").to_pylist() == [[0, 1, 1, 0, 1]]


def test_parquet_records_with_pickled_object_columns_are_refused_unread(tmp_path):
    """Ray Data's object extension type unpickles its values when they are converted: a
    crafted records or corpus file must be refused on its schema, before any value is read."""
    import io
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's extension types, as in a Ray Data task)
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    from raylm.documents import parse_documents

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for column in ("text", "messages"):
        sink = io.BytesIO()
        pq.write_table(pa.table({column: ArrowPythonObjectArray.from_objects([Payload()])}), sink)
        raw = sink.getvalue()
        docs = list(parse_documents("c/evil.parquet", raw, column))
        records = list(parse_records("c/evil.parquet", raw))
        for got in (docs, records):
            [(_, err)] = got
            assert isinstance(err, DataError) and "c/evil.parquet: column" in str(err)
            assert "ray.data.arrow_pickled_object" in str(err)
        assert not marker.exists()
    pq.read_table(io.BytesIO(raw)).column("messages").to_pylist()  # the payload is real
    assert marker.exists()
