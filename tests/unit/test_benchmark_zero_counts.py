"""A benchmark given a count of 0 (timed steps, rounds, saves, requests, batch) says so in one
line, as argparse does for a malformed flag.

Each of these ended in a traceback from deep inside the run (a division by zero, the median
of no timings, a reshape of an empty batch), or, for train_throughput's tokens a step,
printed a result for no work at all."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

CASES = [
    ("attention_mask.py", ["--steps", "0", "--seq-lens", "32", "--batch", "1", "--skip-flex"], "--steps 0"),
    ("attention_mask.py", ["--batch", "0", "--seq-lens", "32", "--skip-flex"], "--batch 0"),
    ("checkpoint_blocking.py", ["--preset", "tiny", "--saves", "0"], "--saves 0"),
    ("train_throughput.py", ["--device", "cpu", "--preset", "tiny", "--steps", "0"], "--steps 0"),
    ("train_throughput.py", ["--device", "cpu", "--preset", "tiny", "--micro-batch", "0"], "--micro-batch 0"),
    ("engine_fused_step.py", ["--rounds", "0"], "--rounds 0"),
    ("engine_fused_step.py", ["--iters", "0"], "--iters 0"),
    ("decode_throughput.py", ["--device", "cpu", "--preset", "tiny", "--batch-sizes", "1,0"], "--batch-sizes 1,0"),
    ("engine_throughput.py", ["--preset", "tiny", "--requests", "0"], "--requests 0"),
    ("ray_overhead.py", ["--device", "cpu", "--steps", "0"], "--steps 0"),
    ("ray_overhead.py", ["--device", "cpu", "--micro-batch", "0"], "--micro-batch 0"),
]


@pytest.mark.parametrize("script,args,named", CASES, ids=[f"{s}:{n}" for s, _, n in CASES])
def test_a_zero_count_is_one_line_naming_the_flag(script, args, named):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert named in proc.stderr.strip().splitlines()[-1]
    assert proc.stdout == ""  # no JSON for a run that did not happen
