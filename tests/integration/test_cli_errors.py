"""Bad input through the real command line: one line naming the problem, no traceback,
exit code 2, and nothing left behind that a later run would take for complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def raylm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raylm: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_unknown_config_key(tmp_path):
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}", "train.lrr=1e-3", cwd=tmp_path))
    assert "train.lrr" in line


def test_wrong_type(tmp_path):
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}", "train.max_steps=lots", cwd=tmp_path))
    assert "train.max_steps" in line and "lots" in line


def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  preset: tiny\n  widht: 3\n")
    line = one_line_error(raylm("pretrain", "--config", str(tmp_path / "run.yaml"), cwd=tmp_path))
    assert "model.widht" in line


def test_missing_corpus_path(tmp_path):
    missing = tmp_path / "nope" / "corpus.jsonl"
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(missing), cwd=tmp_path))
    assert str(missing) in line
    assert not list((tmp_path / "runs").glob("*/tokenizer/tokenizer.model"))


def test_empty_corpus_directory(tmp_path):
    (tmp_path / "corpus").mkdir()
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(tmp_path / "corpus"),
                                cwd=tmp_path))
    assert str(tmp_path / "corpus") in line and "no corpus files" in line


def test_empty_corpus_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(tmp_path / "empty.jsonl"),
                                cwd=tmp_path))
    assert "empty.jsonl" in line and "empty" in line


def test_text_field_that_does_not_exist(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document number {i} " * 20}) + "\n" for i in range(50)))
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(corpus),
                                "data.text_field=content", cwd=tmp_path))
    assert "docs.jsonl:1" in line and "'content'" in line and "body" in line
    assert not (tmp_path / "runs" / "quickstart" / "tokenizer").exists()


def test_help_explains_every_subcommand(tmp_path):
    for args in (["--help"], ["pretrain", "--help"], ["quickstart", "--help"], ["data", "prepare", "--help"],
                 ["tokenizer", "train", "--help"], ["generate", "--help"]):
        proc = raylm(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "usage: raylm" in proc.stdout
    assert "train.lr=3e-4" in raylm("--help", cwd=tmp_path).stdout
