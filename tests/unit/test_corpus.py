"""The built-in offline corpus: size, format, determinism, atomic reuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydoc_data.topics import topics

import raylm.corpus as corpus_mod
from raylm.corpus import SUCCESS_MARKER, write_builtin_corpus


def _read_docs(paths: list[str]) -> list[str]:
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                assert set(rec) == {"text"}
                assert isinstance(rec["text"], str) and rec["text"].strip()
                docs.append(rec["text"])
    return docs


def test_writes_min_bytes_of_valid_jsonl(tmp_path):
    out = tmp_path / "corpus"
    paths = write_builtin_corpus(str(out), min_bytes=300_000, docs_per_shard=25)
    assert paths == sorted(paths) and len(paths) > 1
    assert [Path(p).name for p in paths] == [f"builtin-{i:05d}.jsonl" for i in range(len(paths))]
    assert (out / SUCCESS_MARKER).is_file()
    docs = _read_docs(paths)
    assert sum(len(d.encode("utf-8")) for d in docs) >= 300_000
    # Every pydoc topic comes first, in key order, even though they alone exceed min_bytes.
    assert len(docs) >= len(topics)
    assert docs[0].startswith(topics[sorted(topics)[0]].strip()[:50])
    for d in docs:
        assert all(line == line.rstrip() for line in d.splitlines())
    # Written via a temp dir that was renamed into place: nothing left beside it.
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_deterministic(tmp_path):
    # 600 kB reaches past the pydoc topics into the ast-extracted stdlib docstrings.
    a = write_builtin_corpus(str(tmp_path / "a"), min_bytes=600_000, docs_per_shard=50)
    b = write_builtin_corpus(str(tmp_path / "b"), min_bytes=600_000, docs_per_shard=50)
    assert [Path(p).name for p in a] == [Path(p).name for p in b]
    for pa, pb in zip(a, b):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    assert any(d.startswith("module ") for d in _read_docs(a))


def test_existing_complete_corpus_is_reused(tmp_path, monkeypatch):
    out = tmp_path / "c"
    first = write_builtin_corpus(str(out), min_bytes=300_000)
    mtimes = {p: os.stat(p).st_mtime_ns for p in first}

    def fail():
        raise AssertionError("corpus was regenerated")

    monkeypatch.setattr(corpus_mod, "_pydoc_topic_docs", fail)
    monkeypatch.setattr(corpus_mod, "_stdlib_docstring_docs", fail)
    again = write_builtin_corpus(str(out), min_bytes=300_000)
    assert again == first
    assert {p: os.stat(p).st_mtime_ns for p in again} == mtimes


def test_incomplete_corpus_is_replaced(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "builtin-00000.jsonl").write_text('{"text": "half-writ')  # no _SUCCESS marker
    paths = write_builtin_corpus(str(out), min_bytes=300_000)
    assert (out / SUCCESS_MARKER).is_file()
    assert sum(len(d.encode()) for d in _read_docs(paths)) >= 300_000
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_default_size_is_reachable(tmp_path):
    paths = write_builtin_corpus(str(tmp_path / "full"))
    docs = _read_docs(paths)
    assert sum(len(d.encode("utf-8")) for d in docs) >= 1_500_000
    # The stdlib part contributes class/function docstrings with signature headers.
    assert any("\ndef " in d or d.startswith("def ") for d in docs)
    assert any("\nclass " in d for d in docs)


def test_the_listing_of_a_built_in_corpus_is_its_shards(tmp_path):
    # The _SUCCESS marker beside the shards is no corpus file, and no error either.
    from raylm.data import list_corpus

    paths = write_builtin_corpus(str(tmp_path / "corpus"), min_bytes=1000, docs_per_shard=500)
    assert (tmp_path / "corpus" / SUCCESS_MARKER).is_file()
    assert [f.uri for f in list_corpus(str(tmp_path / "corpus"))] == paths
