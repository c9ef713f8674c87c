"""Checkpoint loads read per rank, straight from S3 (raylm.checkpoint.RangedReader): the
2-worker run of benchmarks/checkpoint_io.py on the test S3 server. Each rank reads about its
own share of the bytes instead of the whole checkpoint, the loaded state equals what the
download-then-load path gives, and a weights-only load reads no byte of an optimizer entry."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(s3_server):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_io.py"), "--storage",
                           f"s3://{s3_server.bucket}/{prefix}",
                           "--preset", "tiny", "--workers", "2"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    s3_server.delete_prefix(prefix + "/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_each_rank_reads_its_share_from_s3_and_loads_the_same_state(report):
    total = report["checkpoint_bytes"]
    ranks = report["ranks"]
    assert len(ranks) == 2 and all(r["same_state"] for r in ranks), ranks
    for r in ranks:
        assert r["download"]["bytes"] == total  # the old way: every rank fetched everything
        assert 0 < r["ranged"]["bytes"] < 0.6 * total, r  # about half, plus the small index files
    # Together the ranks read the checkpoint about once, not once each.
    assert sum(r["ranged"]["bytes"] for r in ranks) < 1.15 * total


def test_weights_only_load_skips_the_optimizer(report):
    w = report["ranks"][0]["weights_only"]
    assert w["optimizer_ranges_read"] == 0
    assert w["model_entry_bytes"] <= w["bytes"] < 0.5 * report["checkpoint_bytes"], w
