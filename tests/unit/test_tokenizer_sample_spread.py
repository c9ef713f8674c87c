"""The tokenizer's training sample spreads over the corpus's files (raylm.pipeline.sample_documents):
read in listing order until the budget, a corpus of English files then Russian ones trained
a vocabulary that had never seen a Cyrillic letter. A corpus within the budget is read whole,
in order, as before."""

import json

import raylm.pipeline as pipeline
from raylm.config import load_config
from raylm.pipeline import sample_documents


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def _corpus(tmp_path, files: int = 6, docs: int = 400):
    for i in range(files):
        word = "the quick brown fox jumps" if i < files // 2 else "съешь же ещё этих мягких булок"
        _write(tmp_path / f"{i:02d}-{'en' if i < files // 2 else 'ru'}.jsonl",
               [f"{word} {i} {j}" for j in range(docs)])
    return tmp_path


def test_a_sample_smaller_than_the_corpus_takes_from_its_later_files_too(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "SAMPLE_BYTES_PER_FILE", 1000)  # 1 MB at full scale
    corpus = _corpus(tmp_path)
    cfg = load_config(overrides=[f"data.path={corpus}/*.jsonl"])
    english = sum(p.stat().st_size for p in corpus.glob("*-en.jsonl"))
    budget = english // 2  # in listing order, the English files alone would fill it
    sample = list(sample_documents(cfg, budget))
    russian = sum("съешь" in t for t in sample)
    assert 0.25 < russian / len(sample) < 0.75, (russian, len(sample))
    assert sum(len(t.encode()) for t in sample) >= budget * 0.8  # the budget is used
    assert sample == list(sample_documents(cfg, budget))  # the same sample every time (seeded)


def test_a_corpus_within_the_budget_is_read_whole_in_order(tmp_path):
    corpus = _corpus(tmp_path, files=3, docs=20)
    cfg = load_config(overrides=[f"data.path={corpus}/*.jsonl"])
    want = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert list(sample_documents(cfg, 10_000_000)) == want


def test_files_shorter_than_their_share_leave_it_to_the_others(tmp_path, monkeypatch):
    """One big file among small ones: the small ones give all they have, the big one the rest."""
    monkeypatch.setattr(pipeline, "SAMPLE_BYTES_PER_FILE", 1000)
    _write(tmp_path / "a-small.jsonl", ["tiny document one"])
    _write(tmp_path / "b-small.jsonl", ["tiny document two"])
    _write(tmp_path / "c-big.jsonl", [f"a longer document number {j} with words" for j in range(2000)])
    cfg = load_config(overrides=[f"data.path={tmp_path}/*.jsonl"])
    size = sum(p.stat().st_size for p in tmp_path.glob("*.jsonl"))
    sample = list(sample_documents(cfg, size // 2))
    assert "tiny document one" in sample and "tiny document two" in sample
    assert sum(len(t.encode()) for t in sample) >= size // 2 * 0.8
    assert len(sample) == len(set(sample))  # the second pass goes on where each file stopped
