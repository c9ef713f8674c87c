"""record.json lists the bad records the run's data skipped, in both data modes. A prepared
dataset keeps them in its manifest and data card too; a stream (data.mode=stream) keeps no
other copy, its log said them once. A stream without de-duplication lists none (its workers
skip them unlisted): null there, not an empty list that would say there were none.
The streamed run's own manifest, made by `stream_datasets` on Ray, is checked in
tests/integration/test_stale_run_outputs.py."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from raylm.config import load_config
from raylm.corpus import iter_builtin_documents
from raylm.data import prepare
from raylm.record import write_record
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    """A small corpus with two bad lines, and a tokenizer trained on its text."""
    root = tmp_path_factory.mktemp("corpus")
    texts = list(itertools.islice(iter_builtin_documents(), 200))
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(3, "not json")
    lines.insert(40, json.dumps({"body": "no text field"}))
    (root / "docs").mkdir()
    (root / "docs" / "a.jsonl").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer(texts, str(root / "tok"), 384)
    return str(root / "docs"), tok


def _record(tmp_path, manifest, tok, *more: str) -> dict:
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=r", *more])
    with open(write_record(cfg, "pretrain", tok, manifest)) as f:
        return json.load(f)


def test_a_prepared_runs_record_lists_its_bad_records(corpus_and_tokenizer, tmp_path):
    docs, tok = corpus_and_tokenizer
    cfg = load_config(overrides=[f"data.path={docs}", "data.seq_len=32", "data.max_bad_records=5"])
    manifest = prepare(cfg.data, tok, str(tmp_path / "data"), cfg.seed, log=lambda *_: None)
    listed = manifest["stats"]["bad_records"]
    assert [b[len(docs) + 1:].split(":")[:2] for b in listed] == [["a.jsonl", "4"], ["a.jsonl", "41"]]
    assert _record(tmp_path, manifest, tok)["data"]["bad_records"] == listed


def _streamed(docs: str, tok, dedup: str, bad: list[str]) -> dict:
    """A manifest as `raylm.data.stream_datasets` returns it (its fields the record reads)."""
    return {"format_version": 1, "mode": "stream", "key": "k" * 16, "seed": 0, "seq_len": 32,
            "tokenizer_sha256": tok.sha256, "sources": [{"uri": os.path.join(docs, "a.jsonl"), "size": 1, "etag": "1"}],
            "val_sources": [], "files": [os.path.join(docs, "a.jsonl")], "dedup": dedup, "duplicates_dropped": 0,
            "bad_records": bad}


def test_a_streamed_runs_record_lists_its_bad_records(corpus_and_tokenizer, tmp_path):
    docs, tok = corpus_and_tokenizer
    bad = [f"{docs}/a.jsonl:4: malformed JSON (Expecting value at column 1)"]
    data = _record(tmp_path, _streamed(docs, tok, "exact", bad), tok, "data.mode=stream")["data"]
    assert data["mode"] == "stream" and data["bad_records"] == bad
    assert _record(tmp_path, _streamed(docs, tok, "near", []), tok, "data.mode=stream")["data"]["bad_records"] == []


def test_a_stream_without_dedup_lists_none(corpus_and_tokenizer, tmp_path):
    docs, tok = corpus_and_tokenizer
    data = _record(tmp_path, _streamed(docs, tok, "none", []), tok, "data.mode=stream", "data.dedup=none")["data"]
    assert data["bad_records"] is None
