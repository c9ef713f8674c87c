"""The GPU benchmarks run end to end on CPU at tiny size, and their parity checks hold.

No timing is asserted: these shapes on a shared CPU say nothing about speed. What is
asserted is that each benchmark runs, prints its JSON, and, for training, that raylm and the
transformers peer started from the same weights agree on the first step (loss and every
parameter's gradient), which is what makes their throughput comparable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.train import NextTokenObjective, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
# One thread: on a busy machine OpenMP threads contending for cores make tiny models ~100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # stdout holds the JSON object and nothing else


def test_train_throughput_float8_switch_cpu_smoke():
    """--float8 runs (emulated on CPU) and still computes the peer's step to float8 precision."""
    pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install -e '.[float8]')")
    pytest.importorskip("transformers", reason="transformers is not installed: no peer to compare with")
    out = _run("train_throughput.py", "--device", "cpu", "--preset", "tiny", "--seq-len", "64",
               "--micro-batch", "2", "--warmup", "1", "--steps", "1", "--dtype", "fp32", "--float8")
    assert out["settings"]["float8"] is True
    assert out["parity_ok"], (out["first_loss_rel_diff"], out["grad_rel_diff_max"], out["grad_rel_diff_worst_param"])
    assert out["grad_rel_diff_max"] > 1e-3  # float8 rounding is visible: the switch took effect


def _load_train_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_train_throughput_cpu_smoke_and_parity():
    has_peer = importlib.util.find_spec("transformers") is not None
    # The smoke command, plus the chunked loss the GPU default uses (a chunk that does not
    # divide the 2 x 64 rows), so FSDP2 + hidden_states + chunked CE is checked against the peer.
    out = _run("train_throughput.py", "--device", "cpu", "--preset", "tiny", "--seq-len", "64",
               "--micro-batch", "2", "--warmup", "1", "--steps", "2", "--dtype", "fp32",
               "--chunked-ce", "--ce-chunk", "48", *([] if has_peer else ["--skip-peer"]))
    for key in ("device", "torch", "settings", "model", "flops_per_token", "raylm", "peer"):
        assert key in out, key
    assert out["settings"]["precision"] == "fp32" and out["settings"]["chunked_ce"] is True
    if not has_peer:
        pytest.skip("transformers is not installed: the peer and the parity check did not run")
    for key in ("transformers", "ratio_tokens_per_s", "first_loss_raylm", "first_loss_peer", "parity_ok"):
        assert key in out, key
    for side in ("raylm", "peer"):
        r = out[side]
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["mfu"] is None  # no peak FLOP/s for a CPU: no invented MFU
    assert out["raylm"]["skipped_steps"] == 0
    # Same initial weights, same batch, fp32: the same computation up to rounding.
    assert out["first_loss_raylm"] == pytest.approx(out["first_loss_peer"], rel=1e-4)
    assert out["grad_rel_diff_max"] < 1e-3, out["grad_rel_diff_worst_param"]
    assert out["params_compared"] == 2 + 9 * out["model"]["n_layers"]  # embedding, final norm, 9 per block
    assert out["parity_ok"] is True


def test_decode_throughput_cpu_smoke():
    out = _run("decode_throughput.py", "--device", "cpu", "--preset", "tiny", "--new-tokens", "8")
    assert [r["batch"] for r in out["results"]] == [1, 32]
    for r in out["results"]:
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_step"] > 0


def test_decode_throughput_compiled_cpu_smoke():
    """--compile (inductor on CPU; CUDA graphs need a GPU): two graphs, the prefill and one
    decode step for every position, and the compiled step computes what the eager one does.
    One batch size: each compiles in about a minute on a busy 2-core machine."""
    out = _run("decode_throughput.py", "--device", "cpu", "--preset", "tiny", "--new-tokens", "6",
               "--prompt-len", "8", "--batch-sizes", "3", "--compile")
    assert [r["batch"] for r in out["results"]] == [3]
    assert out["graphs_per_batch_size"] == 2, out["compile_stats"]
    for r in out["results"]:
        assert r["decode_tokens_per_s"] > 0
        assert r["parity"]["max_abs_logit_diff"] < 1e-4 * max(1.0, r["parity"]["max_abs_logit"]), r["parity"]


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_objective_equals_plain_in_train_step(one_thread, tied):
    """NextTokenObjective with chunk_size is a drop-in for the plain objective in train_step:
    same loss and gradient norm (plain model, fp32). (Parameters after the step are not compared:
    Adam's first update is ~lr * sign(grad), so rounding in near-zero gradients flips it.)"""
    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      ffn_multiple_of=16, tie_embeddings=tied)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    tokens[0, 3:7] = tokens[0, 3]  # repeated tokens: targets that recur within a chunk
    batches = [{"tokens": tokens[:2]}, {"tokens": tokens[2:]}]  # two micro-batches
    results = []
    for objective in (NextTokenObjective(z_loss=1e-3), NextTokenObjective(z_loss=1e-3, chunk_size=10)):
        model = build_model(cfg, seed=0)
        opt = make_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
        stats = train_step(model, opt, batches, objective, lr=1e-2, grad_clip=1.0)
        results.append(stats)
    plain, chunked = results
    assert chunked.count == plain.count == 4 * 16
    assert chunked.loss == pytest.approx(plain.loss, rel=1e-5)
    assert chunked.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    assert not plain.skipped and not chunked.skipped


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_commands_are_valid_for_their_benchmarks(tmp_path):
    """Every command the one-command GPU suite runs parses with its benchmark's own parser."""
    suite = _load("gpu_suite.py")
    assert set(suite.SUITE) >= {"train-124m", "train-1b", "ray-overhead-124m", "decode-eager", "decode-compiled"}
    for name in suite.SUITE:
        cmd = suite.command(name, tmp_path / f"x-{name}.json")
        script = Path(cmd[1]).name
        args = _load(script).parse_args(cmd[2:])
        assert args.out == str(tmp_path / f"x-{name}.json")


def test_gpu_suite_table_from_benchmark_json():
    suite = _load("gpu_suite.py")
    train = _run("train_throughput.py", "--device", "cpu", "--preset", "tiny", "--seq-len", "32",
                 "--micro-batch", "2", "--warmup", "1", "--steps", "1", "--dtype", "fp32", "--skip-peer")
    decode = _run("decode_throughput.py", "--device", "cpu", "--preset", "tiny", "--new-tokens", "4")
    text = suite.table({"train-124m": train, "decode-compiled": decode})
    assert text.startswith("Device: ")
    assert f"{train['raylm']['tokens_per_s']:,.0f} tok/s" in text and "not run" in text
    for r in decode["results"]:
        assert f"batch {r['batch']}: {r['decode_tokens_per_s']:,.0f} tok/s" in text
    assert "train-1b" not in text  # benchmarks that did not run are left out, not invented


def test_serve_load_pools_rounds_and_splits_each_rounds_first_wave():
    """serve_load's figures pool every round's requests; under load, each round's first
    `concurrency` requests by send time are its first wave and the rest are steady."""
    bench = _load("serve_load.py")

    def req(sent, ttft, tokens=4):
        return {"sent": sent, "ttft": ttft, "itl": [0.01], "tpot": 0.01, "tokens": tokens, "events": 2, "end": 1.0}

    # Two rounds at concurrency 2: the first two sent in each round are its first wave.
    rounds = [([req(0.0, 0.5), req(0.1, 0.6), req(0.2, 0.03), req(0.3, 0.04)], 2.0),
              ([req(5.1, 0.7), req(5.0, 0.8), req(5.3, 0.05), req(5.2, 0.06), {"error": "HTTP 503"}], 2.0)]
    s = bench.summarize(rounds, 2)
    assert (s["rounds"], s["requests"], s["errors"], s["wall_s"]) == (2, 9, 1, 4.0)
    assert s["output_tokens_per_s"] == 8 * 4 / 4.0 and s["first_errors"] == ["HTTP 503"]
    assert s["first_wave"]["requests"] == 4 and s["first_wave"]["ttft_p50_s"] >= 0.5
    assert s["steady"]["requests"] == 4 and s["steady"]["ttft_p95_s"] == 0.06
    assert "steady" not in bench.summarize(rounds[:1], 1)  # one at a time: no waves


def test_engine_fused_step_times_the_same_math_both_ways():
    """The fused forward it times gives the two separate forwards' logits: what makes its
    timings a comparison of two ways to compute one thing."""
    out = _run("engine_fused_step.py", "--rows", "3", "--prompt-lens", "2,5", "--rounds", "1", "--iters", "1")
    assert [r["prompt_len"] for r in out["results"]] == [2, 5]
    for r in out["results"]:
        assert r["fused_logits_max_abs_diff"] < 1e-4, r
        assert set(r["newcomer_worst_ms"]) == {"separate", "fused_at_best", "fused_gather"}


def test_ray_overhead_defaults_on_a_cpu_are_the_issues_tiny_configuration():
    """Run without arguments on a CPU, it took the GPU defaults (gpt2-124m at seq 1024) and was
    killed for memory on a 24 GiB machine, with no message."""
    spec = importlib.util.spec_from_file_location("ray_overhead_args", BENCH / "ray_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.parse_args(["--device", "cpu"])
    assert (a.preset, a.seq_len, a.micro_batch, a.global_batch, a.warmup, a.steps) == ("tiny", 128, 16, 32, 60, 60)
    a = mod.parse_args(["--device", "cuda"])
    assert (a.preset, a.seq_len, a.global_batch, a.warmup, a.steps) == ("gpt2-124m", 1024, 16, 20, 20)
    a = mod.parse_args(["--device", "cpu", "--preset", "gpt2-124m", "--steps", "5", "--warmup", "3"])
    assert (a.preset, a.seq_len, a.warmup, a.steps) == ("gpt2-124m", 128, 5, 5)  # given values win


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_suite_refuses_to_run_without_cuda_even_with_a_device_name(tmp_path):
    """--device-name only names the files: given it on a CPU machine, the suite ran the GPU
    shapes on the CPU (gpt2-124m decode, then 1b training: hours, or killed for memory)."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--device-name", "h100", "--skip-tests",
                           "--only", "decode-eager", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert "decode_throughput.py" not in proc.stderr and not any(tmp_path.iterdir())  # nothing started


def test_gpu_suite_table_only_without_results_fails_and_says_where_it_looked(tmp_path):
    """--table-only over a directory without the suite's JSON printed an empty table and exit 0."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--table-only", "--device-name", "h100",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "h100-train-124m.json" in proc.stderr and str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr
    # With one result there, the table holds that row.
    suite = _load("gpu_suite.py")
    decode = {"device": "NVIDIA H100", "results": [{"batch": 1, "decode_tokens_per_s": 1600.0}]}
    (tmp_path / "h100-decode-eager.json").write_text(json.dumps(decode))
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--table-only", "--device-name", "h100",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == suite.table({"decode-eager": decode})


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None, reason="accelerate is installed here")
def test_eval_throughput_refuses_a_missing_peer_package_before_any_work(tmp_path):
    """Without accelerate (which lm-eval's hf backend needs) the benchmark trained a run, timed
    raylm's two backends for minutes, then died with a traceback at the peer, printing nothing."""
    proc = subprocess.run([sys.executable, str(BENCH / "eval_throughput.py"), "--items", "4",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          env={**ENV, "TMPDIR": str(tmp_path)}, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert "accelerate" in proc.stderr and "--skip hf" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_checkpoint_blocking_removes_its_default_checkpoint_directory(tmp_path):
    """Without --storage the checkpoints went to a temporary directory that was never removed:
    two full checkpoints (3 GB at the default gpt2-124m) left in the temp directory by every run."""
    proc = subprocess.run([sys.executable, str(BENCH / "checkpoint_blocking.py"), "--preset", "tiny", "--saves", "1",
                           "--steps-between", "1"], capture_output=True, text=True,
                          env={**ENV, "TMPDIR": str(tmp_path)}, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["storage"] == "local" and len(out["sync"]["blocking_s_per_save"]) == 1
    assert "raylm-ckptbench-" in proc.stderr  # it did save under the temporary directory
    assert not list(tmp_path.glob("raylm-ckptbench-*"))


def test_startup_since_refuses_an_unknown_rev_in_one_line(tmp_path):
    """A --rev git cannot check out ended in a CalledProcessError traceback."""
    data = tmp_path / "corpus.txt"
    data.write_text("some text\n")
    proc = subprocess.run([sys.executable, str(BENCH / "startup_since.py"), "--rev", "no-such-rev-in-this-repo",
                           "--data", str(data)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "--rev no-such-rev-in-this-repo is not a commit" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_throughput_cpu_smoke_engine_equals_sequential_generate():
    """The engine and its peer (the same requests one by one through `generate`) produce the
    same tokens (seeded sampling, no stop token): what makes their tokens/s comparable."""
    out = _run("engine_throughput.py", "--preset", "tiny", "--requests", "3", "--concurrency", "1,2",
               "--prompt-lens", "3,6", "--new-tokens", "3,5", "--threads", "1")
    seq = out["sequential_generate"]
    assert out["requests"] == 3 and seq["tokens"] > 0 and seq["output_tokens_per_s"] > 0
    assert [r["concurrency"] for r in out["engine"]] == [1, 2]
    for r in out["engine"]:
        assert r["tokens"] == seq["tokens"] and r["output_tokens_per_s"] > 0 and r["vs_sequential_generate"] > 0
        assert r["requests_equal_to_generate"] == 3, r
