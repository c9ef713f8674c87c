"""Near-dedup's parameters against what they promise: the LSH S-curve at the default
threshold, short texts (fewer words than a shingle), and hashing that agrees across Ray
tasks, so near-duplicates in different files (different tasks) are still found."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylm.config import DataConfig, load_config
from raylm.data import find_duplicates, list_corpus
from raylm.dedup import MinHasher, estimated_jaccard, is_empty_signature, lsh_params, shingles, true_jaccard

pytestmark = pytest.mark.integration


def _candidate(j: float, bands: int, rows: int) -> float:
    return 1 - (1 - j**rows) ** bands


def test_default_bands_catch_a_pair_at_the_threshold_as_documented():
    cfg = DataConfig()
    bands, rows = lsh_params(cfg.near_dup_threshold, cfg.minhash_perm)
    assert (cfg.near_dup_threshold, cfg.minhash_perm, bands, rows) == (0.8, 128, 13, 7)
    # raylm.dedup's docstring: p~0.003 at J=0.3, 0.10 at 0.5, 0.67 at 0.7, 0.95 at 0.8, 0.993 at 0.85.
    got = [round(_candidate(j, bands, rows), 3) for j in (0.3, 0.5, 0.7, 0.8, 0.85)]
    assert got == [0.003, 0.097, 0.673, 0.953, 0.993]


def test_texts_shorter_than_a_shingle():
    assert len(shingles("thank you", 5)) == 1 and len(shingles("a", 5)) == 1 and len(shingles("!?", 5)) == 0
    h = MinHasher()
    # The same words, whatever the case and punctuation: one shingle, one signature.
    assert np.array_equal(h.signature("Thank you!"), h.signature("thank you."))
    # Other words, or the same words and more, share nothing: no collision among short texts.
    for a, b in (("thank you", "thank yo"), ("thank you", "thank you so"), ("ok", "no"), ("a b", "b a"),
                 ("one two three four", "one two three four five")):
        assert true_jaccard(a, b) == 0.0 and estimated_jaccard(h.signature(a), h.signature(b)) < 0.1, (a, b)
    # No words: the shared empty signature, which the pipeline keeps out of LSH.
    assert is_empty_signature(h.signature("...")) and is_empty_signature(h.signature(""))
    assert not is_empty_signature(h.signature("x"))


def test_signatures_in_a_ray_task_equal_the_drivers(ray_local):
    import ray

    def _signatures(texts):  # local: pickled by value, so a worker needs no test module
        h = MinHasher(num_perm=128, seed=0)  # as raylm.data builds one in each task
        return [h.signature(t).tolist() for t in texts]

    texts = ["The quick brown fox jumps over the lazy dog", "किताब पढ़ो और सीखो हर दिन", "a"]
    assert ray.get(ray.remote(_signatures).remote(texts)) == _signatures(texts)


def test_near_duplicates_in_different_files_are_found_through_ray_tasks(tmp_path, ray_local):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    pairs = []
    for _ in range(20):
        words = [vocab[i] for i in rng.integers(0, len(vocab), size=300)]
        edited = list(words)
        for pos in rng.choice(len(words), size=3, replace=False):
            edited[pos] = "edited"
        pairs.append((" ".join(words), " ".join(edited)))
    short = [("Thank you!", "thank you."), ("OK", "ok"), ("!!!", "???")]  # the last pair has no words
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a, _ in pairs + short))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for _, b in pairs + short))
    cfg = load_config(overrides=[f"data.path={tmp_path}", "data.dedup=near", "data.min_chars=1"]).data
    files = list_corpus(cfg.path)
    on_ray, bad = find_duplicates(files, [], cfg, in_process=False)
    assert not bad
    in_process, _ = find_duplicates(files, [], cfg, in_process=True)
    assert on_ray == in_process
    assert all(f == 1 for f, _ in on_ray)  # the copies, never the first
    found = sum((1, i + 1) in on_ray for i in range(len(pairs)))
    assert found >= 18, found  # Jaccard ~0.91-0.95: well above 0.8
    assert (1, len(pairs) + 1) in on_ray and (1, len(pairs) + 2) in on_ray
    assert (1, len(pairs) + 3) not in on_ray  # "!!!" and "???": exact dedup only, and they differ
