"""data.mode=stream against data.mode=prepare on a local Ray cluster: a stream writes no data
card and no summary line, so what it skips (bad records within data.max_bad_records,
duplicates) is said when it starts, as `prepare` lists it in its summary and data card."""

from __future__ import annotations

import dataclasses
import json

import pytest

from raylm.config import load_config
from raylm.data import stream_datasets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from raylm.tokenizer import train_tokenizer

    words = " ".join(f"word{i} river stone{i % 7} light" for i in range(400))
    return train_tokenizer([words], str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


def test_a_stream_lists_the_bad_records_it_skips(ray_local, tmp_path, tokenizer):
    """Within the budget, a stream skipped a bad record without a word: the driver's first
    pass found it and dropped its list, and the workers' own count is never shown."""
    docs = [f"Document {i} is about river {i} and stone {i * 7}, told at some length here." for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[20:] + docs[:1])
                                      + '{"text": oops\n' + json.dumps({"body": "no text field"}) + "\n")
    cfg = load_config(overrides=[f"data.path={tmp_path}", "data.seq_len=16", "data.mode=stream",
                                 "data.dedup=exact", "data.max_bad_records=2"]).data
    said = []
    _, manifest = stream_datasets(cfg, tokenizer, 0, log=said.append)
    skipped = [s for s in said if s.startswith("data: skipped bad record: ")]
    assert [s.split(": ", 3)[2] for s in skipped] == [f"{tmp_path}/b.jsonl:12", f"{tmp_path}/b.jsonl:13"], said
    assert "no field 'text'" in skipped[1]
    assert manifest["bad_records"] and manifest["dedup"] == "exact" and manifest["duplicates_dropped"] == 1
    assert any("de-duplication exact, 1 duplicate and 2 bad records skipped" in s for s in said), said

    # Without a first pass (data.dedup=none), the workers skip them unlisted: that is said.
    said.clear()
    stream_datasets(dataclasses.replace(cfg, dedup="none"), tokenizer, 0, log=said.append)
    assert any("without listing them" in s and "data.max_bad_records=2" in s for s in said), said
