"""storage.delete never removes a local directory holding the filesystem's root, the home
directory or the working directory, as it never empties a whole bucket: a path that led a
caller there (an empty or relative run path, `~`) is refused, naming it, and nothing goes."""

import os

import pytest

from raylm import storage
from raylm.errors import StorageError


@pytest.mark.parametrize("given", ["", ".", "..", "~", "/"])
def test_the_working_home_or_root_directory_is_never_deleted(tmp_path, monkeypatch, given):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("kept")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    with pytest.raises(StorageError, match="refusing to delete"):
        storage.delete(given)
    assert (work / "keep.txt").read_text() == "kept"


def test_a_directory_beside_them_is_deleted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    storage.delete("run")
    assert not (tmp_path / "run").exists() and os.path.isdir(tmp_path)
