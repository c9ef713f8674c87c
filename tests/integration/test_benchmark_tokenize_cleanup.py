"""benchmarks/tokenize_throughput.py removes its working directory when it ends.

It built the corpus, trained a tokenizer and prepared the corpus two or three times under a
temporary directory that it never removed: a few times --mb of disk left behind by every
run (the README's 200 MB run). No speed is asserted."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs tinyshakespeare.txt beside the repository")
def test_tokenize_benchmark_leaves_no_working_directory():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tokenize_throughput.py"),
                           "--data", str(SHAKESPEARE), "--mb", "0.3", "--shards", "2", "--no-dedup-run"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["raylm_pipeline"]["tokens"] > 0
    work = re.search(r"corpus in (\S+)", proc.stderr)
    assert work, proc.stderr[-2000:]
    assert not Path(work.group(1)).exists(), f"{work.group(1)} left behind"
