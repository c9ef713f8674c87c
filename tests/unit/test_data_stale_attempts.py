"""A re-prepare removes every earlier attempt under the dataset directory whole: its directories,
and the partial shard a killed write left as a temporary file, which listings leave out."""

from __future__ import annotations

import os

from raylm.data import remove_stale_attempts


def _write(root, names) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_stale_attempts_go_whole_and_the_kept_one_stays(tmp_path):
    files = ["attempt-old/train/shard-00000.parquet", "attempt-old/val/shard-00000.parquet",
             "attempt-killed/train/.shard-00000.parquet.0123abcd.raylm-tmp",
             "attempt-new/train/shard-00000.parquet", "attempt-new/val/shard-00000.parquet",
             "manifest.json", "DATACARD.md"]
    _write(tmp_path, files)
    (tmp_path / "attempt-empty" / "train").mkdir(parents=True)
    remove_stale_attempts(str(tmp_path), "attempt-new", None)
    assert sorted(os.listdir(tmp_path)) == ["DATACARD.md", "attempt-new", "manifest.json"]
    assert sorted(os.listdir(tmp_path / "attempt-new" / "train")) == ["shard-00000.parquet"]


def test_only_attempts_raylm_wrote_are_removed(tmp_path):
    """A prepare removed every file and directory whose name starts with "attempt-" as a stale
    attempt of its own, with everything in it: a user's `attempt-notes/`, `attempt-log.txt`."""
    files = ["attempt-notes/keep.txt", "attempt-notes/train/also-kept.txt", "attempt-log.txt",
             "attempt-old/train/shard-00000.parquet", "attempt-old/val/shard-00000.parquet",
             "attempt-killed/train/.shard-00000.parquet.0123abcd.raylm-tmp",
             "attempt-new/train/shard-00000.parquet", "manifest.json"]
    _write(tmp_path, files)
    (tmp_path / "attempt-empty" / "val").mkdir(parents=True)
    remove_stale_attempts(str(tmp_path), "attempt-new", None)
    assert sorted(os.listdir(tmp_path)) == ["attempt-log.txt", "attempt-new", "attempt-notes", "manifest.json"]
    assert (tmp_path / "attempt-notes" / "keep.txt").read_bytes() == b"x"
    assert (tmp_path / "attempt-notes" / "train" / "also-kept.txt").exists()
