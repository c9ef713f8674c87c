"""benchmarks/startup_since.py end to end at tiny size: an earlier commit (HEAD here, so that the
test needs no particular history) checked out into a worktree, both sides' quality benchmarks
run in fresh processes, and start-up taken the same way on both. No timing is asserted."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.test_benchmarks_ray import BENCH, SHAKESPEARE, load_benchmark
from tests.small import SMALL

pytestmark = pytest.mark.integration
REPO = BENCH.parent


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not found (the benchmark's corpus)")
@pytest.mark.timeout(600)
def test_startup_since_runs_both_sides_and_removes_its_worktree(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: startup_since.py checks an earlier commit out")
    bench = load_benchmark("startup_since")
    data = tmp_path / "text.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    out = bench.main(["--rev", "HEAD", "--pairs", "1", "--budget", "2", "--data", str(data), *SMALL])
    (pair,) = out["runs"]
    for side in ("old", "new"):
        assert 0 < pair[side]["startup_s"] < pair[side]["wall_s"] and pair[side]["steps"] > 0
    assert (out["old_startup_s_median"], out["new_startup_s_median"]) == (pair["old"]["startup_s"], pair["new"]["startup_s"])
    assert out["ratio"] == round(pair["new"]["startup_s"] / pair["old"]["startup_s"], 3)
    assert out["halved"] == (pair["new"]["startup_s"] <= pair["old"]["startup_s"] / 2)
    worktrees = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert "raylm-startup-" not in worktrees
