"""`raylm tokenizer train --out DIR` where DIR cannot be written (under a file, or on a path the
system refuses) is a one-line error naming --out before the corpus is read or the tokenizer
trained; it was an OSError traceback from the tokenizer's final write, reported as a bug."""

from __future__ import annotations

import pytest

from raylm.cli import main


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through (not an Exception)."""


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    def reached(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr("raylm.pipeline.ensure_corpus", reached)


def test_an_out_under_a_file_is_refused_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "tok"
    assert main(["tokenizer", "train", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raylm: error: {out}: cannot write a tokenizer there ({tmp_path / 'afile'}: "), err
    assert err.endswith("name another --out"), err


def test_a_writable_out_goes_on_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new" / "tok"
    with pytest.raises(Reached):
        main(["tokenizer", "train", "--out", str(out)])
    assert not (tmp_path / "new").exists() or list((tmp_path / "new").iterdir()) == []  # no probe left
