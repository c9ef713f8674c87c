"""benchmarks/ray_overhead.py and benchmarks/quality_cpu.py end to end on CPU at tiny size, on
the session's local Ray cluster.

No timing is asserted (tiny shapes on a shared CPU say nothing about speed). What is asserted:
the three runs (bare step, loop without Ray, Ray Train with Ray Data streaming the prepared
parquet shards) all run, report tokens/s and data-wait time from the timed window only, and
train the same thing: same blocks, order and schedule give the same final loss.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str = "ray_overhead"):
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `emit` only when run as a script
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)  # a starved Ray Data stream hangs silently; fail instead
def test_ray_overhead_cpu_smoke(ray_local, tmp_path):
    import raylm.data

    bench = load_benchmark()
    in_memory = raylm.data.IN_MEMORY_BYTES
    out = bench.main(["--device", "cpu", "--preset", "tiny", "--seq-len", "32", "--micro-batch", "2",
                      "--global-batch", "4", "--warmup", "1", "--steps", "2", "--work-dir", str(tmp_path)])
    assert raylm.data.IN_MEMORY_BYTES == in_memory  # --source parquet restores the threshold
    s = out["settings"]
    assert s["warmup"] == 2 and s["max_steps"] == 4 and s["grad_accum"] == 2  # warm-up rounded to --steps
    assert s["precision"] == "fp32" and s["compile"] is False
    for run in ("bare", "loop", "ray"):
        r = out[run]
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and math.isfinite(r["last_loss"]), run
        assert r["mfu"] is None  # no peak FLOP/s for a CPU: no invented MFU
    for run in ("loop", "ray"):
        r = out[run]
        assert [row["step"] for row in r["rows"]] == [2, 4]  # one row after warm-up, one after the timed steps
        assert r["data_wait_s"] >= 0 and 0 <= r["data_wait_fraction"] <= 1 and r["data_wait_warmup_s"] >= 0
        assert r["tokens_per_s"] == r["rows"][-1]["tokens_per_s"]
    assert len(out["bare"]["losses"]) == 4
    # The bare step is timed on both sides of the Ray run, and the ratio is against their mean.
    after = out["bare_after"]
    assert after["tokens_per_s"] > 0 and after["losses"] == out["bare"]["losses"]
    mean = (out["bare"]["tokens_per_s"] + after["tokens_per_s"]) / 2
    assert out["ratio_ray_to_bare"] == pytest.approx(out["ray"]["tokens_per_s"] / mean)
    assert out["ratio_ray_to_bare_after"] == pytest.approx(out["ray"]["tokens_per_s"] / after["tokens_per_s"])
    assert out["ratio_ray_to_bare"] > 0 and out["ratio_loop_to_bare"] > 0 and out["goal_ratio"] == 0.95  # the CPU goal
    # fp32 on CPU, same weights, blocks, order and learning rates: the same final loss.
    for run in ("loop", "ray"):
        check = out["same_training"][run]
        assert check["ok"] and check["last_loss_rel_diff"] < 1e-5, (run, check)
    assert (tmp_path / "data" / "manifest.json").is_file() and (tmp_path / "runs" / "ray" / "metrics.jsonl").is_file()


SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.timeout(600)
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not found (the benchmark's corpus)")
def test_quality_benchmark_trains_for_its_time_budget_and_scores(ray_local):
    from tests.small import SMALL

    bench = load_benchmark("quality_cpu")
    out = bench.main(["--data", str(SHAKESPEARE), *SMALL, "train.time_budget_s=3"])
    assert out["config"]["time_budget_s"] == 3 and out["config"]["max_steps"] == 100000
    assert 0 < out["step"] < 100000  # the clock, not the step cap, ended training
    assert 0 < out["val_bpb"] < 8 and out["val_tokens_scored"] > 0
    assert out["within_budget"] == (out["wall_s"] <= out["budget_s"])
    assert out["goal_met"] is False  # 3 s of training is far from 2.25 bits/byte
    assert out["overrides"][-1] == "train.time_budget_s=3"
    assert 0 <= out["startup_s"] < out["trained_until_s"] <= out["wall_s"]
    # The peer: raylm's bare loop on the same model, tokenizer and held-out text, trained until
    # as long after its own start as raylm's run trained after its start.
    peer = out["peer"]
    assert peer["steps"] > 0 and 0 < peer["val_bpb"] < 8 and peer["tokens_per_byte"] == out["tokens_per_byte"]
    assert 0 <= peer["startup_s"] and peer["train_budget_s"] <= out["trained_until_s"]
    assert out["ratio_bpb"] == round(out["val_bpb"] / peer["val_bpb"], 4)
    assert out["ratio_goal_met"] == (out["val_bpb"] <= peer["val_bpb"])
