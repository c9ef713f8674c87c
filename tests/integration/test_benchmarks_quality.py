"""benchmarks/quality_cpu.py run as a script, as its results are saved (`> result.json`): stdout
holds its JSON object and nothing else. No timing or quality asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.small import SMALL

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.timeout(600)
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not found (the benchmark's corpus)")
def test_quality_cpu_stdout_is_its_json_alone():
    """raylm's progress log and the Ray workers' step lines went to stdout ahead of the JSON, so
    the saved output of a run was not JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_cpu.py"), "--no-peer",
                           "--data", str(SHAKESPEARE), *SMALL, "train.num_workers=1", "train.time_budget_s=0", "train.max_steps=3"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["benchmark"] == "quality_cpu" and out["step"] > 0 and "peer" not in out
    assert "pretrain:" in proc.stderr and "done: step" in proc.stderr  # the progress is still shown, on stderr
