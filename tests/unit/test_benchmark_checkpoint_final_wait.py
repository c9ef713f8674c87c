"""benchmarks/checkpoint_blocking.py reports the wait for the last save.

`final_wait_s` read the growth of `CheckpointSaver.blocking_s` around `finish()`, which only
`save` adds to: it was 0.0 in every run, and an async save's whole background write, upload
and commit at the end went unreported. With no training step after the save, the async
save is still in flight when the loop ends, so its wait must show. No speed is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_async_final_wait_counts_the_save_still_in_flight(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_blocking.py"), "--preset", "tiny",
                           "--saves", "1", "--steps-between", "0", "--storage", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    # The async save returned after the copy to host memory; its write, upload and commit
    # happen inside the final wait, which then cannot be zero.
    assert out["async"]["final_wait_s"] > 0, out["async"]
    assert (tmp_path / "async" / "ckpt-00000001" / "COMMITTED").is_file()
