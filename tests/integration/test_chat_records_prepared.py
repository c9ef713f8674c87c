"""prepare_chat on Ray Data: PII in SFT and DPO records is redacted before it trains, a record
repeated (across files, or with other metadata, or differing only in a redacted address)
trains once, and the manifest says how many were replaced and dropped."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from raylm import synthetic as S
from raylm.chat_data import dataset_key, prepare_chat
from raylm.config import DataConfig
from raylm.data import list_corpus
from raylm.tokenizer import train_tokenizer

pytestmark = pytest.mark.integration

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def _decoded(tok, out, manifest, columns) -> str:
    text = []
    for split in ("train", "val"):
        for shard in manifest[split]["shards"]:
            table = pq.read_table(os.path.join(out, shard["path"]))
            text += [tok.decode(ids) for c in columns for ids in table.column(c).to_pylist()]
    return "\n".join(text)


def test_sft_records_are_redacted_and_deduplicated(ray_local, tok, tmp_path):
    src = tmp_path / "sft"
    src.mkdir()
    unique = [{"messages": [{"role": "user", "content": f"add: {i} + {i}"},
                            {"role": "assistant", "content": str(2 * i)}]} for i in range(40)]
    _write(src / "a.jsonl", unique + [{"prompt": "mail bob@example.com please", "completion": "ok", "id": 1}] * 3)
    # Across files, with other metadata, and with another address: the same record once redacted.
    _write(src / "b.jsonl", [{"prompt": "mail eve@example.org please", "completion": "ok", "id": 2},
                             {"messages": [{"role": "user", "content": "mail bob@example.com please"},
                                           {"role": "assistant", "content": "ok"}], "source": "x"}])
    cfg = DataConfig(path=str(src), seq_len=64, val_fraction=0.2)  # the defaults: redact all, dedup near
    out = str(tmp_path / "out")
    m = prepare_chat("sft", cfg, tok, out, 0, log=QUIET)
    assert m["key"] == dataset_key("sft", list_corpus(cfg.path), cfg, tok.sha256, 0)
    st = m["stats"]
    assert st["records"] == 45 and st["dropped"] == {"exact_duplicate": 4}
    assert st["train_records"] + st["val_records"] == 41
    assert st["pii"] == {"email": 1, "phone": 0, "ip": 0, "card": 0}  # of the records kept
    assert m["config"] == {"dedup": "exact", "redact_pii": ["email", "phone", "ip", "card"]}
    text = _decoded(tok, out, m, ["tokens"])
    assert "@example" not in text and text.count("<EMAIL>") == 1

    # Both off: every record trains as written, and the dataset above is not reused.
    off = DataConfig(path=str(src), seq_len=64, val_fraction=0.2, dedup="none", redact_pii=())
    m2 = prepare_chat("sft", off, tok, out, 0, log=QUIET)
    assert m2["key"] == dataset_key("sft", list_corpus(off.path), off, tok.sha256, 0) != m["key"]
    assert m2["stats"]["dropped"] == {} and m2["stats"]["pii"] == {} and m2["config"]["dedup"] == "none"
    assert m2["stats"]["train_records"] + m2["stats"]["val_records"] == 45
    assert _decoded(tok, out, m2, ["tokens"]).count("bob@example.com") == 4


def test_dpo_triples_are_deduplicated_not_a_prompts_pairs(ray_local, tok, tmp_path):
    pairs = [{"prompt": f"add: {i} + 1", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(30)]
    pairs += [{"prompt": "reply to bob@example.com", "chosen": "done", "rejected": "no"}] * 2
    pairs += [{"prompt": "reply to bob@example.com", "chosen": "done", "rejected": "later"}]
    path = tmp_path / "pairs.jsonl"
    _write(path, pairs)
    out = str(tmp_path / "out")
    m = prepare_chat("dpo", DataConfig(path=str(path), seq_len=64, val_fraction=0.2), tok, out, 0, log=QUIET)
    assert m["stats"]["dropped"] == {"exact_duplicate": 1}
    assert m["stats"]["train_records"] + m["stats"]["val_records"] == 32
    assert m["stats"]["pii"]["email"] == 2
    text = _decoded(tok, out, m, ["chosen", "rejected"])
    assert "@example" not in text
