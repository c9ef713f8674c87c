"""`raylm tokenizer train --out DIR` never writes over what DIR holds, as `raylm export --out`
does not: DIR may be a run's own tokenizer, which the run's checkpoints and prepared data were
made with. It once replaced such a tokenizer (local or s3://) without a word."""

from __future__ import annotations

import json
import os

import pytest

from raylm import storage
from raylm.cli import main
from raylm.tokenizer import META_FILE, MODEL_FILE, Tokenizer


def _corpus(path, extra: str = "") -> str:
    words = "alpha beta gamma delta the quick brown fox jumps over lazy dog".split()
    with open(path, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(30)) + extra}) + "\n")
    return str(path)


def _train(data: str, out: str) -> int:
    return main(["tokenizer", "train", "--data", data, "--out", out, "tokenizer.vocab_size=300"])


def _refused(capsys, out: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err == f"raylm: error: --out {out}: already exists; write the tokenizer to a new directory"


def test_a_local_tokenizer_is_not_replaced(tmp_path, capsys):
    out = str(tmp_path / "run" / "tokenizer")
    assert _train(_corpus(tmp_path / "a.jsonl"), out) == 0
    before = {n: (tmp_path / "run" / "tokenizer" / n).read_bytes() for n in os.listdir(out)}
    assert sorted(before) == sorted([META_FILE, MODEL_FILE])
    capsys.readouterr()

    assert _train(_corpus(tmp_path / "b.jsonl", " zzz qqq"), out) == 2  # another corpus, same --out
    _refused(capsys, out)
    assert {n: (tmp_path / "run" / "tokenizer" / n).read_bytes() for n in os.listdir(out)} == before
    assert os.listdir(tmp_path / "run") == ["tokenizer"]  # no temporary directory left beside it


@pytest.mark.parametrize("kind", ["corpus dir", "file", "dangling link"])
def test_other_local_outputs_are_kept(tmp_path, capsys, kind):
    data = _corpus(tmp_path / "a.jsonl")
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    elif kind == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    assert _train(data, str(out)) == 2
    _refused(capsys, str(out))
    assert os.path.islink(out) if kind == "dangling link" else (
        (out if kind == "file" else out / "notes.txt").read_text() == "keep me")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "out"]


def test_an_empty_directory_is_used(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()  # nothing there to lose
    assert _train(_corpus(tmp_path / "a.jsonl"), str(out)) == 0
    assert Tokenizer.load(str(out)).vocab_size == 300


def test_an_s3_tokenizer_is_not_replaced(tmp_path, capsys, s3_prefix):
    out = storage.join(s3_prefix, "run", "tokenizer")
    assert _train(_corpus(tmp_path / "a.jsonl"), out) == 0
    before = {f.uri: storage.read_bytes(f.uri) for f in storage.list_files(out, pattern=False)}
    assert sorted(u.rsplit("/", 1)[1] for u in before) == sorted([META_FILE, MODEL_FILE])
    capsys.readouterr()

    assert _train(_corpus(tmp_path / "b.jsonl", " zzz qqq"), out) == 2
    _refused(capsys, out)
    assert {f.uri: storage.read_bytes(f.uri) for f in storage.list_files(out, pattern=False)} == before
