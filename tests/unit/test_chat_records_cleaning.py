"""SFT and DPO records get pre-training's PII redaction (data.redact_pii) in every text they
train on, before the split hash and the duplicate key; the SFT split hashes the conversation,
not the record's other fields; and the dataset key follows both settings."""

from __future__ import annotations

import hashlib
import json
import types

import pytest

from raylm import synthetic as S
from raylm.chat_data import CHAT_ENCODING, KIND_ROWS, dataset_key, encode_file
from raylm.config import DataConfig
from raylm.data import FORMAT_VERSION
from raylm.pii import PII_TYPES
from raylm.tokenizer import train_tokenizer

EMAIL, CARD, PHONE, IP = "bob@example.com", "4111 1111 1111 1111", "(415) 555-0132", "192.168.1.20"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


def _encode(tok, records, kind, val_fraction=0.0, redact=PII_TYPES):
    lines = "\n".join(json.dumps(r) for r in records).encode()
    return encode_file({"path": ["d/r.jsonl"], "bytes": [lines]}, tok, kind, {"d/r.jsonl": 0}, val_fraction,
                       redact=redact)


def _texts(tok, seqs: str) -> list[str]:
    return [tok.decode(ids) for ids, _ in json.loads(seqs)]


def test_pii_in_every_trained_field_is_replaced_and_counted(tok):
    """Message contents (any role), prompt, completion, chosen and rejected: each is trained
    on, so each is redacted, as pre-training redacts its documents."""
    sft = [{"messages": [{"role": "system", "content": f"admin {EMAIL}"},
                         {"role": "user", "content": f"card {CARD}"},
                         {"role": "assistant", "content": f"call {PHONE}"}]},
           {"prompt": f"host {IP}", "completion": f"mail {EMAIL}", "id": "kept out of the text"}]
    out = _encode(tok, sft, "sft")
    assert list(out["error"]) == ["", ""]
    text = " ".join(t for s in out["seqs"] for t in _texts(tok, s))
    assert not any(p in text for p in (EMAIL, CARD, PHONE, IP))
    assert all(p in text for p in ("<EMAIL>", "<CARD_NUMBER>", "<PHONE>", "<IP_ADDRESS>"))
    assert [list(out[f"pii_{t}"]) for t in PII_TYPES] == [[1, 1], [1, 0], [0, 1], [1, 0]]

    dpo = [{"prompt": f"write to {EMAIL}", "chosen": f"sure: {EMAIL}", "rejected": f"no, call {PHONE}"},
           {"messages": [{"role": "user", "content": f"ip {IP}"}], "chosen": "ok", "rejected": f"card {CARD}"}]
    out = _encode(tok, dpo, "dpo")
    assert list(out["error"]) == ["", ""]
    text = " ".join(t for s in out["seqs"] for t in _texts(tok, s))
    assert not any(p in text for p in (EMAIL, CARD, PHONE, IP))
    assert [sum(out[f"pii_{t}"]) for t in PII_TYPES] == [2, 1, 1, 1]


def test_redaction_off_trains_the_text_as_it_is(tok):
    out = _encode(tok, [{"prompt": f"mail {EMAIL}", "completion": "ok"}], "sft", redact=())
    assert EMAIL in _texts(tok, out["seqs"][0])[0]
    assert not [k for k in out if k.startswith("pii_")]


def test_records_differing_only_in_redacted_pii_are_one_record(tok):
    """Redaction comes before the duplicate key and the split: two records that train as the
    same text are duplicates, and land on one side; the prompt/completion and messages forms
    of one conversation too. Different text keeps different keys."""
    records = [{"prompt": f"mail {a}", "completion": "sent", "id": i}
               for i, a in enumerate(["bob@example.com", "eve@example.org", "x.y@mail.example.net"] * 10)]
    records.append({"messages": [{"role": "user", "content": "mail <EMAIL>"},
                                 {"role": "assistant", "content": "sent"}]})
    out = _encode(tok, records, "sft", val_fraction=0.5)
    assert not any(out["error"]) and len(set(out["key"])) == 1 and len(set(out["val"].tolist())) == 1
    other = _encode(tok, [{"prompt": "mail <EMAIL>", "completion": "not sent"}], "sft")
    assert other["key"][0] != out["key"][0]


def test_dpo_duplicates_are_whole_triples(tok):
    """A prompt's several pairs are distinct records; the same (prompt, chosen, rejected) is a
    duplicate in either record form."""
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "c"},
             {"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    out = _encode(tok, pairs, "dpo")
    assert not any(out["error"])
    assert out["key"][0] == out["key"][2] != out["key"][1]


def test_a_pair_whose_sides_differ_only_in_redacted_pii_is_a_bad_record(tok):
    out = _encode(tok, [{"prompt": "q", "chosen": "mail bob@example.com", "rejected": "mail eve@example.org"}], "dpo")
    assert out["error"][0].startswith("d/r.jsonl:1: 'chosen' and 'rejected' differ only in PII that "
                                      "data.redact_pii replaces")
    assert out["key"][0] == "" and out["seqs"][0] == ""
    kept = _encode(tok, [{"prompt": "q", "chosen": "mail bob@example.com", "rejected": "mail eve@example.org"}],
                   "dpo", redact=())
    assert kept["error"][0] == ""


def test_sft_split_ignores_the_records_other_fields(tok):
    """One conversation with other metadata (an id, a source) lands on one side: split by the
    whole record, it landed on both, and validation scored text that trained."""
    records = [{"prompt": "add: 2 + 3", "completion": "5", "id": i, "source": f"set-{i % 3}"} for i in range(40)]
    lines = "\n".join(json.dumps(r) for r in records).encode()
    out = encode_file({"path": ["d/r.jsonl"], "bytes": [lines]}, tok, "sft", {"d/r.jsonl": 0}, 0.5)
    assert not any(out["error"]) and len(set(out["val"].tolist())) == 1


# --------------------------------------------------------------------------- the key

FILES = [types.SimpleNamespace(uri="/d/records.jsonl", size=10, etag_or_mtime="1")]


def _key(kind, **data):
    return dataset_key(kind, FILES, DataConfig(path="/d/records.jsonl", **data), "t" * 64, 0)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_dataset_key_follows_redaction_and_dedup(kind):
    """A dataset prepared under other redaction or de-duplication settings holds other rows,
    so it is prepared again, not reused."""
    keys = {_key(kind, redact_pii=r, dedup=d) for r in ((), ("email",), PII_TYPES) for d in ("none", "exact")}
    assert len(keys) == 6
    # Near is exact for records (the same rows, the same key); the order types are named in is not the rows'.
    assert _key(kind, dedup="near") == _key(kind, dedup="exact")
    assert _key(kind, redact_pii=("card", "email")) == _key(kind, redact_pii=("email", "card"))


def test_dpo_key_with_both_off_is_the_key_before():
    """DPO's key without redaction and de-duplication names nothing of them: only its row
    rules' version (KIND_ROWS, raised when the rows changed) tells it from the key before
    they were added. SFT's split changed, so its key did."""
    def before(kind, rows):
        fields = {"kind": kind, "sources": [["/d/records.jsonl", 10, "1"]], "seq_len": 128, "val_fraction": 0.02,
                  "tokenizer": "t" * 64, "seed": 0, "version": FORMAT_VERSION, "chat_encoding": CHAT_ENCODING,
                  **({"rows": rows} if rows else {})}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    off = {"redact_pii": (), "dedup": "none"}
    assert _key("dpo", **off) == before("dpo", KIND_ROWS["dpo"])
    assert _key("sft", **off) != before("sft", 0)
