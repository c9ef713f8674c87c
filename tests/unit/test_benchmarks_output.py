"""What every benchmark's shared tail (benchmarks/emit.py) promises about its output: stdout and
--out hold strict JSON (no NaN or Infinity tokens), and --out is either the whole new result or
left as it was, never a part of one. Real processes and files; no timing asserted."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_learning_rate_is_null_in_the_json(tmp_path):
    """mup_transfer scores a diverged rate as an infinite loss: it was printed as the token
    `Infinity`, which strict JSON parsers refuse."""
    out = tmp_path / "mup.json"
    proc = subprocess.run([sys.executable, str(BENCH / "mup_transfer.py"), "--corpus", "markov", "--seq", "16",
                           "--steps", "4", "--val-batches", "1", "--batch", "2", "--widths", "16", "32",
                           "--lrs", "0.01", "1e12", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for text in (proc.stdout, out.read_text()):
        result = strict_loads(text)
        for row in result["rows"]:
            assert row["val_loss_by_lr"]["0.01"] > 0  # the sane rate trained
            assert row["val_loss_by_lr"]["1e+12"] is None  # the diverged one: no number, and valid JSON
    assert strict_loads(out.read_text()) == strict_loads(proc.stdout)


def test_every_rate_diverged_has_no_best_rate():
    """A width where every rate diverged had its smallest rate as the best and a shift of 0:
    perfect transfer, read off two runs that learnt nothing."""
    proc = subprocess.run([sys.executable, str(BENCH / "mup_transfer.py"), "--corpus", "markov", "--seq", "16",
                           "--steps", "4", "--val-batches", "1", "--batch", "2", "--widths", "16", "32",
                           "--lrs", "1e12", "1e13"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = strict_loads(proc.stdout)
    assert {(r["best_lr"], r["fitted_best_log2_lr"]) for r in result["rows"]} == {(None, None)}
    assert result["shift_log2"] == result["fitted_shift_log2"] == {"standard": None, "muP": None}


EMIT = """
import sys
sys.path.insert(0, sys.argv[1])
from emit import run_and_emit
run_and_emit(lambda: {"settings": {"out": sys.argv[2]}, "rows": ["x" * 1000] * 200})
"""


def test_out_is_the_previous_file_or_the_whole_new_one(tmp_path):
    """A write that fails part way (here the file-size limit; a full disk or a kill alike) left a
    truncated JSON at --out, which a later reader (gpu_suite.py --table-only) took for a result."""
    out = tmp_path / "result.json"
    out.write_text('{"previous": true}\n')
    limit = 50_000  # the result is ~200 kB: its write fails part way

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", EMIT, str(BENCH), str(out)], capture_output=True, text=True,
                          env=ENV, preexec_fn=small_files, timeout=120)
    assert proc.returncode != 0  # the write failed (Python ignores SIGXFSZ: an OSError)
    assert strict_loads(out.read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind
    # Without the limit the same write replaces the file whole.
    proc = subprocess.run([sys.executable, "-c", EMIT, str(BENCH), str(out)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert strict_loads(out.read_text()) == strict_loads(proc.stdout) and len(strict_loads(proc.stdout)["rows"]) == 200
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
