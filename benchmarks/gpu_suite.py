"""Every GPU figure of the README's Performance table, in one command, on one CUDA GPU.

    python benchmarks/gpu_suite.py                       # runs all, writes JSON, prints the table
    python benchmarks/gpu_suite.py --only train-124m decode-compiled
    python benchmarks/gpu_suite.py --table-only          # the table from the JSON already written
    python benchmarks/gpu_suite.py --dry-run             # the commands, without running them
    python benchmarks/gpu_suite.py --skip-tests          # the benchmarks without the GPU test tier

The GPU test tier (`tests/gpu`: bf16 FSDP2 over NCCL, compile with activation checkpointing,
float8 at 1B, compiled decode, resume, host caches) runs first: figures from a machine where
the core is broken would mean nothing. If it fails, the benchmarks still run (their numbers
help find out why) and the exit status is non-zero.

Each benchmark runs in its own process (a fresh CUDA context and compile cache, so one cannot
warm the next) and writes `<out-dir>/<device>-<name>.json`, e.g. `h100-train-124m.json`. A
failing benchmark is reported and the others still run; the exit status is non-zero if any
failed. The table is Markdown, ready for the README: each raylm figure beside its peer's
from the same run, and each goal beside the figure it is about.

The issue's goals on one H100: train-124m >= 46% MFU and >= 1.35x the peer; train-1b >= 52%
MFU and >= 1.15x; ray-overhead >= 0.97x the bare step; decode at batch 1 >= 1,500 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests" / "gpu")]

# name -> (script, arguments). The shapes are the issue's; micro-batches fit an 80 GB GPU.
SUITE = {
    "train-124m": ("train_throughput.py", ["--preset", "gpt2-124m", "--seq-len", "1024", "--micro-batch", "16"]),
    "train-1b": ("train_throughput.py", ["--preset", "1b", "--seq-len", "2048", "--micro-batch", "4"]),
    # The peer runs again here so that float8's parity check against it also runs on the GPU.
    "train-1b-float8": ("train_throughput.py", ["--preset", "1b", "--seq-len", "2048", "--micro-batch", "4",
                                                "--float8"]),
    "ray-overhead-124m": ("ray_overhead.py", ["--preset", "gpt2-124m", "--seq-len", "1024", "--micro-batch", "16",
                                              "--global-batch", "16"]),
    "decode-eager": ("decode_throughput.py", ["--preset", "gpt2-124m"]),
    "decode-compiled": ("decode_throughput.py", ["--preset", "gpt2-124m", "--compile"]),
}


def device_slug() -> str:
    """'h100' for 'NVIDIA H100 80GB HBM3': the part of the name that tells GPUs apart."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; the CPU smoke tests are in tests/unit/test_benchmarks_smoke.py")
    words = torch.cuda.get_device_name().replace("NVIDIA", "").split()
    return (words[0] if words else "gpu").lower()


def command(name: str, out: Path) -> list[str]:
    script, args = SUITE[name]
    return [sys.executable, str(HERE / script), *args, "--out", str(out)]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = "{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def table(results: dict[str, dict]) -> str:
    """The README's Performance table from the suite's JSON (missing runs are left out)."""
    device = next((r.get("device") for r in results.values() if r.get("device")), "?")
    rows = [f"Device: {device}.", "",
            "| benchmark | raylm | peer (same run) | ratio | goal |", "|---|---:|---:|---:|---|"]
    goals = {"train-124m": "≥ 46% MFU, ≥ 1.35×", "train-1b": "≥ 52% MFU, ≥ 1.15×"}
    for name in ("train-124m", "train-1b", "train-1b-float8"):
        r = results.get(name)
        if not r:
            continue
        me, peer = r["raylm"], r.get("peer")
        mine = f"{_num(me['tokens_per_s'])} tok/s, {_pct(me['mfu'])} MFU, {_num(me['peak_memory_gib'], '{:.1f}')} GiB"
        theirs = (f"{_num(peer['tokens_per_s'])} tok/s, {_pct(peer['mfu'])} MFU" if peer else "not run")
        ratio = _num(r.get("ratio_tokens_per_s"), "{:.2f}×")
        parity = "" if r.get("parity_ok", True) else " (parity check FAILED)"
        rows.append(f"| {name} | {mine} | {theirs}{parity} | {ratio} | {goals.get(name, 'switch')} |")
    r = results.get("ray-overhead-124m")
    if r:
        ray, bare = r["ray"], r["bare"]
        rows.append(f"| Ray Train + Ray Data, 124m | {_num(ray['tokens_per_s'])} tok/s, data wait "
                    f"{_pct(ray.get('data_wait_fraction'))} of step time | bare step {_num(bare['tokens_per_s'])} tok/s "
                    f"| {r['ratio_ray_to_bare']:.3f}× | ≥ 0.97× |")
    for name in ("decode-eager", "decode-compiled"):
        r = results.get(name)
        if not r:
            continue
        by_batch = {x["batch"]: x for x in r["results"]}
        cells = ", ".join(f"batch {b}: {_num(x['decode_tokens_per_s'])} tok/s" for b, x in sorted(by_batch.items()))
        rows.append(f"| {name}, 124m | {cells} | | | batch 1 ≥ 1,500 tok/s |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(SUITE), help="run these benchmarks only")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where the JSON files go")
    p.add_argument("--device-name", default="", help="file-name prefix (default: from the GPU, e.g. h100)")
    p.add_argument("--table-only", action="store_true", help="print the table from existing JSON; run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU test tier (tests/gpu) first")
    args = p.parse_args()
    names = args.only or list(SUITE)
    if args.table_only and not args.device_name:
        p.error("--table-only needs --device-name (the prefix of the JSON files, e.g. h100)")
    # Anything that runs needs a GPU, whatever --device-name says: on a CPU the GPU shapes would
    # take hours or be killed for memory.
    detected = None if args.table_only or args.dry_run else device_slug()
    slug = args.device_name or detected or "gpu"
    out_dir = Path(args.out_dir)
    failed = []
    if not args.table_only and not args.skip_tests:
        print("$ python " + " ".join(TESTS[1:]), file=sys.stderr, flush=True)
        if not args.dry_run and subprocess.run(TESTS, cwd=HERE.parent, stdout=sys.stderr).returncode != 0:
            failed.append("tests/gpu")
            print("gpu_suite: the GPU test tier failed (its output is above); running the benchmarks anyway",
                  file=sys.stderr)
    if not args.table_only:
        for name in names:
            cmd = command(name, out_dir / f"{slug}-{name}.json")
            print("$ python " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
            if not args.dry_run and subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                failed.append(name)
                print(f"gpu_suite: {name} failed (its output is above)", file=sys.stderr)
    if args.dry_run:
        return 0
    results = {n: json.loads((out_dir / f"{slug}-{n}.json").read_text())
               for n in names if (out_dir / f"{slug}-{n}.json").is_file() and n not in failed}
    if args.table_only and not results:
        print(f"gpu_suite: no results to tabulate: none of {', '.join(f'{slug}-{n}.json' for n in names)} "
              f"is in {out_dir}", file=sys.stderr)
        return 1
    print(table(results))
    if failed:
        print(f"gpu_suite: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
