"""A prepare into a directory holding the user's own files removed, once it committed, every
file and directory there whose name starts with "attempt-" (a folder `attempt-notes/` of the
user's, a file `attempt-log.txt`) as a stale attempt of its own, with everything in it."""

from __future__ import annotations

import os

from raylm.data import remove_stale_attempts


def test_only_attempts_raylm_wrote_are_removed(tmp_path):
    files = ["attempt-notes/keep.txt", "attempt-notes/train/also-kept.txt", "attempt-log.txt",
             "attempt-old/train/shard-00000.parquet", "attempt-old/val/shard-00000.parquet",
             "attempt-killed/train/.shard-00000.parquet.0123abcd.raylm-tmp",
             "attempt-new/train/shard-00000.parquet", "manifest.json"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "attempt-empty" / "val").mkdir(parents=True)
    remove_stale_attempts(str(tmp_path), "attempt-new", None)
    assert sorted(os.listdir(tmp_path)) == ["attempt-log.txt", "attempt-new", "attempt-notes", "manifest.json"]
    assert (tmp_path / "attempt-notes" / "keep.txt").read_bytes() == b"x"
    assert (tmp_path / "attempt-notes" / "train" / "also-kept.txt").exists()
