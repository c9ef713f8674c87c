"""The tokenizer's sample of a compressed corpus: a .jsonl.gz corpus that fits the sample's
limit on disk but holds many times it in text was read in listing order, so the sample came
from its first file alone (here: no Chinese at all, and the vocabulary never sees it)."""

from __future__ import annotations

import gzip
import json

from raylm.config import load_config
from raylm.pipeline import sample_documents


def _write(path, text: str, n: int) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{text} {i}"}) + "\n")


def test_a_compressed_corpus_is_sampled_across_its_files(tmp_path):
    _write(tmp_path / "a_en.jsonl.gz", "the quick brown fox jumps over the lazy dog " * 4, 16000)
    _write(tmp_path / "b_zh.jsonl.gz", "敏捷的棕色狐狸跳过了懒狗" * 8, 8000)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 2_000_000  # fits the limit on disk, not in text
    cfg = load_config(overrides=[f"data.path={tmp_path}/*.jsonl.gz", "data.redact_pii=[]"])
    texts = list(sample_documents(cfg, 2_000_000))
    assert any("狐狸" in t for t in texts) and any("fox" in t for t in texts)
