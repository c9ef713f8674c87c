"""De-duplication and the train/validation split as they meet PII redaction, checked without a
cluster (the first pass and the cleaning stage run here, as `prepare` runs them for a small
corpus): documents that differ only in an address or a number are one text once redacted."""

from __future__ import annotations

import json

import pytest

from raylm.config import load_config
from raylm.data import _clean_file, corpus_files, find_duplicates


def _kept_rows(folder, *overrides: str) -> list[tuple[str, bool]]:
    """(text, is validation) of every document the cleaning stage keeps, as `prepare` runs it."""
    cfg = load_config(overrides=[f"data.path={folder}", "data.val_fraction=0.2", *overrides]).data
    files, val_files = corpus_files(cfg, None)
    drop, bad = find_duplicates(files, val_files, cfg, None, in_process=True) if cfg.dedup != "none" else ({}, [])
    assert not bad
    clean = _clean_file(files, val_files, cfg, None, drop, cfg.redact_pii)
    rows = [clean(f) for f in files]
    return [(t, bool(v)) for r in rows for t, v, d in zip(r["text"], r["val"], r["dropped"]) if not d]


@pytest.mark.parametrize("dedup", ["exact", "near"])
def test_documents_alike_but_for_their_pii_are_one_document(tmp_path, dedup):
    """60 copies of a notice, each with its own address: redacted, they are one text. They were
    hashed for de-duplication and for the split before redaction, so all 60 were kept, some for
    training and the same text in validation (a leak; near-dedup's shingles of a short text
    differ too much to join them)."""
    docs = [f"Please write to user{i}@example.com about the refund for your last order." for i in range(60)]
    unrelated = [f"Document {i} talks about {w} at some length, with words of its own."
                 for i, w in enumerate(["rivers", "mountains", "glaciers", "deserts", "forests"])]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30] + unrelated))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:]))
    kept = _kept_rows(tmp_path, f"data.dedup={dedup}")
    notice = [(t, v) for t, v in kept if "<EMAIL>" in t]
    assert len(notice) == 1, notice  # one copy, on one side of the split
    assert notice[0][0] == "Please write to <EMAIL> about the refund for your last order."
    assert len(kept) == 1 + len(unrelated)


def test_the_split_of_a_redacted_text_does_not_depend_on_what_was_redacted(tmp_path):
    """Without de-duplication, copies that differ only in their PII still land on one side:
    the split hashes the text the model sees."""
    docs = [f"Call me on +1 415 555 {1000 + i:04d} about the order." for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    kept = _kept_rows(tmp_path, "data.dedup=none")
    assert len(kept) == 40 and {t for t, _ in kept} == {"Call me on <PHONE> about the order."}
    assert len({v for _, v in kept}) == 1, kept
