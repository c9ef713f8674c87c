"""`raylm eval` starts Ray only for its pool of scorers: a wrong run path or nothing to
evaluate is one line before any cluster starts, and bits per byte runs in this process."""

from __future__ import annotations

import pytest

import raylm.pipeline
from raylm.cli import main


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test where the command would start (or join) a Ray cluster."""
    monkeypatch.setattr(raylm.pipeline, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))


def test_eval_refuses_a_missing_run_before_starting_ray(tmp_path, capsys, no_ray):
    corpus = tmp_path / "val.jsonl"
    corpus.write_text('{"text": "hello world"}\n')
    assert main(["eval", "--corpus", str(corpus), str(tmp_path / "nosuch")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_eval_with_nothing_to_evaluate_starts_no_ray(tmp_path, capsys, no_ray):
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
