"""The checkpoint-blocking benchmark runs end to end at tiny size and prints its JSON.

No timing is asserted; what is checked is that both modes saved, committed and reported."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_blocking_benchmark_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_blocking.py"), "--preset", "tiny",
                           "--saves", "2", "--steps-between", "1", "--storage", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    for mode in ("sync", "async"):
        assert len(out[mode]["blocking_s_per_save"]) == 2
        # The newest checkpoint of each mode is complete (retention keeps one).
        assert (tmp_path / mode / "ckpt-00000002" / "COMMITTED").is_file()
        assert not (tmp_path / mode / "ckpt-00000001").exists()
    assert out["blocking_ratio_async_vs_sync"] > 0
