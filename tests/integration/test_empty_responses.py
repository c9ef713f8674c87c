"""Post-training rows always hold something to learn from. A record that does not fit a row
is a bad record (counted in `stats.too_long`, named by file and line), never cut into a row
whose responses are gone: no SFT conversation without a target token, no DPO pair whose
sides are both masked out (a constant loss that would still count in the batch mean and in
preference accuracy). A DPO pair's two sides share its prompt's tokens, which are never
scored. Prepared on a real local Ray cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylm import synthetic as S
from raylm.chat_data import COLUMNS, encode_conversation, prepare_chat, prompt_length
from raylm.config import DataConfig
from raylm.tokenizer import train_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


LONG_PROMPT = "add: 1 + 2 + 3 " * 40  # a few hundred tokens: no room for any response in a row of 65


def _records(kind: str) -> list[dict]:
    if kind == "sft":
        return [{"prompt": LONG_PROMPT, "completion": "6"}] + \
               [{"prompt": f"add: {i} + {i}", "completion": str(2 * i)} for i in range(30)]
    return [{"prompt": LONG_PROMPT, "chosen": "6", "rejected": "7"}] + \
           [{"prompt": f"add: {i} + {i}", "chosen": str(2 * i), "rejected": f"-{i}"} for i in range(30)]


def _rows(out, manifest: dict, split: str) -> dict[str, np.ndarray]:
    tables = [pq.read_table(out / s["path"]) for s in manifest[split]["shards"]]
    return {c: np.concatenate([np.array(t.column(c).to_pylist()) for t in tables]) for c in manifest["columns"]}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_record_with_no_room_for_its_response_is_a_bad_record_not_an_empty_row(tmp_path, tok, ray_local, kind):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(kind)))
    said: list[str] = []
    cfg = DataConfig(path=str(path), val_fraction=0.2, seq_len=64, max_bad_records=5)
    manifest = prepare_chat(kind, cfg, tok, str(tmp_path / "out"), 0, log=said.append)
    stats = manifest["stats"]
    assert stats["records"] == 31 and stats["too_long"] == 1
    assert len(stats["bad_records"]) == 1 and stats["bad_records"][0].startswith(f"{path}:1: ")
    assert "longer than a row of data.seq_len + 1 = 65" in stats["bad_records"][0]
    assert any(s.startswith(f"data: skipped bad record: {path}:1: ") for s in said), said
    assert stats["train_records"] + stats["val_records"] == 30  # every other record, whole
    masks = [c for c in COLUMNS[kind] if c.endswith("mask")]
    targets = 0
    for split in ("train", "val"):
        rows = _rows(tmp_path / "out", manifest, split)
        for m in masks:
            per_row = rows[m][:, 1:].sum(axis=1)  # position 0 is never a target
            assert (per_row >= 1).all(), (split, m, per_row)
            targets += int(per_row.sum())
    assert targets == stats["target_tokens"]


def test_over_the_bad_record_budget_no_dataset_is_written(tmp_path, tok, ray_local):
    from raylm.data import DataError

    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records("dpo")))
    cfg = DataConfig(path=str(path), val_fraction=0.2, seq_len=64, max_bad_records=0)
    with pytest.raises(DataError, match="longer than a row"):
        prepare_chat("dpo", cfg, tok, str(tmp_path / "out"), 0, log=lambda *a: None)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("prompt", [
    [{"role": "user", "content": "add: 2 + 3"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": " add:  2 + 3 "}],
])
def test_chosen_and_rejected_share_the_prompt_tokens_and_score_their_response_alone(tok, prompt):
    (c, cm), (r, rm) = encode_conversation(tok, (prompt, "5", "six"), "dpo")
    n = prompt_length(tok, prompt)
    assert c[:n] == r[:n] == tok.encode_chat(prompt, add_generation_prompt=True)[0]
    assert not any(cm[:n]) and not any(rm[:n])  # not the prompt, nor its earlier assistant turn
    # The response and its <|end|>, each side; nothing after it.
    assert cm[n:] == [True] * (len(cm) - n - 1) + [False] and rm[n:] == [True] * (len(rm) - n - 1) + [False]
    assert c[len(c) - 2] == r[len(r) - 2]  # both end their turn the same way
