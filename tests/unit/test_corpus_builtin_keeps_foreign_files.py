"""The built-in corpus replaces only its own leftovers, never files someone else put there."""

from __future__ import annotations

import os

import pytest

from raylm.corpus import SUCCESS_MARKER, write_builtin_corpus
from raylm.errors import ConfigError


def test_a_directory_of_other_files_is_refused_not_deleted(tmp_path):
    """The defect: a directory at the corpus's place without the _SUCCESS marker was taken
    for a half-written built-in corpus and removed whole, so a user's own `<run>/corpus`
    directory (their text) was deleted without a word when data.path was left empty."""
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "mine.txt").write_text("my own text")
    (out / "builtin-00000.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="mine.txt"):
        write_builtin_corpus(str(out), min_bytes=1000)
    assert (out / "mine.txt").read_text() == "my own text"
    assert sorted(os.listdir(tmp_path)) == ["corpus"]  # no temp dir left beside it


def test_a_file_in_its_place_is_one_clear_error(tmp_path):
    out = tmp_path / "corpus"
    out.write_text("not a directory")
    with pytest.raises(ConfigError, match="a file"):
        write_builtin_corpus(str(out), min_bytes=1000)
    assert out.read_text() == "not a directory"


def test_an_empty_directory_or_shards_cut_short_are_still_replaced(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_builtin_corpus(str(empty), min_bytes=1000)
    assert (empty / SUCCESS_MARKER).is_file()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "builtin-00003.jsonl").write_text('{"text": "half')
    paths = write_builtin_corpus(str(cut), min_bytes=1000)
    assert (cut / SUCCESS_MARKER).is_file() and str(cut / "builtin-00003.jsonl") not in paths
