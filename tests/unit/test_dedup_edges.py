"""Driver-side bucketing of de-duplication keys (`_edges_on_driver`, used for small corpora)
against the plain grouping it must agree with: every key's rows in one bucket, exactness
taken from the rows, each bucket of two or more through `bucket_edges`. The driver keeps one
member per key until a second comes, to save memory; the edges must not change."""

from __future__ import annotations

import random

import numpy as np
import pytest

from raylm.data import ERROR_KEY, _edges_on_driver, _error_rows, bucket_edges, bucket_keys
from raylm.dedup import UnionFind


def _corpus() -> list[list[str]]:
    """Three files of 100-word documents with exact and near copies within and across files,
    a copy that is both, short and word-less documents, and empty (filtered) lines."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    originals = [[rng.choice(vocab) for _ in range(100)] for _ in range(30)]

    def near(words: list[str], k: int) -> str:
        out = list(words)
        for i in rng.sample(range(len(out)), k):
            out[i] = f"new{rng.randrange(10**6)}"
        return " ".join(out)

    text = [" ".join(w) for w in originals]
    a = text[:20] + ["Thank you!", "...", "", text[3]]  # exact copy within the file
    b = [near(originals[0], 1), text[5], near(originals[7], 1), "thank you.", "!!!", text[25], near(originals[0], 1)]
    c = [text[5], near(originals[7], 1), near(originals[12], 20), a[20], b[0]] + text[20:30]
    return [a, b, c]


def _batches(files: list[list[str]], mode: str, bad: bool) -> list[dict]:
    out = []
    for f, docs in enumerate(files):
        errors = [""] * len(docs)
        if bad and f == 1:
            errors[4] = "b.jsonl:5: malformed JSON"
        for start in range(0, len(docs), 4):  # several batches per file: buckets span batches
            out.append(bucket_keys({"text": docs[start:start + 4], "file": [f] * len(docs[start:start + 4]),
                                    "line": list(range(start + 1, start + 1 + len(docs[start:start + 4]))),
                                    "error": errors[start:start + 4]}, mode, 128, 0.8))
    return out


def _reference(batches: list[dict], threshold: float):
    """The plain grouping: a list of rows per key, exactness from the key's first row."""
    buckets: dict = {}
    bad = {"file": [], "line": [], "error": []}
    for b in batches:
        for row in zip(b["key"], b["file"].tolist(), b["line"].tolist(), b["exact"].tolist(), b["sig"], b["error"]):
            key, file, line, exact, sig, error = row
            if key == ERROR_KEY:
                bad["file"].append(file), bad["line"].append(line), bad["error"].append(error)
                continue
            g = buckets.setdefault(key, {"file": [], "line": [], "exact": [], "sig": []})
            g["file"].append(file), g["line"].append(line), g["exact"].append(exact), g["sig"].append(sig)
    for g in buckets.values():
        if len(g["file"]) > 1:
            yield bucket_edges({"file": np.array(g["file"]), "line": np.array(g["line"]),
                                "exact": np.array(g["exact"]), "sig": g["sig"]}, threshold)
    if bad["error"]:
        yield _error_rows(bad)


def _rows(edges) -> list[tuple]:
    return [row for e in edges for row in zip(e["a_file"].tolist(), e["a_line"].tolist(), e["b_file"].tolist(),
                                              e["b_line"].tolist(), e["exact"].tolist(), e["error"].tolist())]


def _drops(rows: list[tuple]) -> dict:
    clusters, exact = UnionFind(), set()
    for af, al, bf, bl, ex, err in rows:
        if not err:
            clusters.union((af, al), (bf, bl))
            if ex:
                exact.add((bf, bl))
    return {m: "exact_duplicate" if m in exact else "near_duplicate"
            for members in clusters.groups() for m in members[1:]}


@pytest.mark.parametrize("mode,threshold,bad", [("near", 0.8, True), ("near", 0.0, False), ("exact", 0.8, True)])
def test_driver_bucketing_gives_the_edges_of_the_plain_grouping(mode, threshold, bad):
    batches = _batches(_corpus(), mode, bad)
    got, want = _rows(_edges_on_driver(iter(batches), threshold)), _rows(_reference(batches, threshold))
    assert got == want  # the same edges, in the same order
    drops = _drops(got)
    assert drops[(2, 1)] == drops[(1, 2)] == drops[(0, 24)] == "exact_duplicate"
    assert len(drops) >= 6 and any(ex for *_, ex, _ in got)
    if mode == "near":
        # Near copies across files join their original; the 20-word edit (J ~ 0.3) stays.
        assert drops[(1, 1)] == drops[(1, 3)] == drops[(2, 2)] == drops[(1, 4)] == "near_duplicate"
        assert (2, 3) not in drops
    if bad:
        assert [r[-1] for r in got if r[-1]] == ["b.jsonl:5: malformed JSON"]
