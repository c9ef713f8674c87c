"""`raylm data prepare` with data.val_fraction=0 and no data.val_path can only end in an empty
validation split: refused before any work, naming both settings. It was refused by the
prepare pass itself, once it had read, de-duplicated and tokenized the whole corpus. In
process, without Ray: the prepare call is replaced by one that stops before any work."""

from __future__ import annotations

import itertools

import pytest

from raylm.cli import main


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through (not an Exception)."""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from raylm.corpus import iter_builtin_documents
    from raylm.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("tok") / "tok")
    train_tokenizer(list(itertools.islice(iter_builtin_documents(), 50)), out, 384)
    return out


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    def reached(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr("raylm.data.prepare", reached)
    monkeypatch.setattr("raylm.pipeline.init_ray", reached)
    (tmp_path / "train.txt").write_text("one document of text\n")
    (tmp_path / "val.txt").write_text("another document of text\n")
    return tmp_path


def test_no_validation_split_is_refused_before_the_work(corpus, tokenizer_dir, capsys):
    argv = ["data", "prepare", "--data", str(corpus / "train.txt"), "--out", str(corpus / "out"),
            "--tokenizer", tokenizer_dir, "data.val_fraction=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: data.val_fraction=0 holds out nothing and no data.val_path is set"), err
    assert not (corpus / "out").exists()


@pytest.mark.parametrize("extra", [[], ["data.val_fraction=0", "data.val_path={corpus}/val.txt"]])
def test_a_validation_split_reaches_the_work(corpus, tokenizer_dir, extra):
    argv = ["data", "prepare", "--data", str(corpus / "train.txt"), "--out", str(corpus / "out"),
            "--tokenizer", tokenizer_dir, *(e.format(corpus=corpus) for e in extra)]
    with pytest.raises(Reached):
        main(argv)
