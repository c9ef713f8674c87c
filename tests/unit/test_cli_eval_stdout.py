"""`raylm eval` prints its results on stdout and nothing else, as README says of it ("stdout keeps
the results"): `raylm eval RUN ... > results.md`. Its log lines ("eval: 3 results -> ...") went to
stdout, into the table."""

from __future__ import annotations

import json

import pytest

import raylm.pipeline
from raylm.cli import main


def test_eval_stdout_is_the_results_only(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(raylm.pipeline, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    corpus = tmp_path / "val.jsonl"
    corpus.write_text('{"text": "the cat sat on the mat"}\n{"text": "a dog ran in the park"}\n')
    assert main(["eval", tiny_run, "--corpus", str(corpus), "--workers", "0", "--out", str(tmp_path / "ev")]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("| task | metric |") and all(line.startswith("|") for line in lines[:-1]), out
    assert json.loads(lines[-1]) == {"json": str(tmp_path / "ev" / "results.json"),
                                     "markdown": str(tmp_path / "ev" / "results.md")}
    assert f"eval: 3 results -> {tmp_path / 'ev' / 'results.json'}" in err
