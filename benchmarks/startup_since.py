"""Start-up of the quality benchmark against an earlier commit's, alternating on one machine.

    python benchmarks/startup_since.py                     # against 4bc177e, 3 pairs
    python benchmarks/startup_since.py --rev REV --pairs 5 --budget 20

Start-up is the time from the benchmark's clock start (before the corpus is split, so Ray's
start, tokenizer training, data preparation and worker start-up all count) to the first
training step, computed the same way on both sides from the run's `metrics.jsonl`: the first
training row's time less the window it covers (`quality_cpu.py`'s `startup_s`). The earlier
commit is checked out into a temporary git worktree and runs its own `benchmarks/quality_cpu.py`
and its own raylm, each side in a fresh process with a short training budget (start-up does not
depend on it), alternating old and new so that both see the same machine. 4bc177e is the code
the one-machine goals were measured against (18-27 s to the first step on a slower sitting).
Needs the repository's git history and `tinyshakespeare.txt` (as `quality_cpu.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"  # as quality_cpu.py

# Runs in a child process with the side's checkout first on sys.path: that checkout's
# quality benchmark, its clock start and temp directory observed from outside, so that an
# old benchmark that does not report start-up is measured as today's does.
CHILD = r"""
import importlib.util, json, sys, time
from pathlib import Path
root, data, budget = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location("quality_cpu_side", root / "benchmarks" / "quality_cpu.py")
q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(q)
seen = {}
split, mkdtemp = q.split_corpus, q.tempfile.mkdtemp
def timed_split(*a, **k):
    seen.setdefault("t0", time.time())
    return split(*a, **k)
def kept_mkdtemp(*a, **k):
    seen["work"] = mkdtemp(*a, **k)
    return seen["work"]
q.split_corpus = timed_split
q.tempfile = type("tempfile", (), {"mkdtemp": staticmethod(kept_mkdtemp)})
args = (["--no-peer"] if "--peer" in Path(spec.origin).read_text() else []) + ["--data", data,
    f"train.time_budget_s={budget}", "train.max_steps=100000", *sys.argv[4:]]
out = q.main(args)
if not isinstance(out, dict):
    sys.exit(2)
metrics = next(Path(seen["work"], "runs").rglob("metrics.jsonl"))
rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
first = next(r for r in rows if r.get("kind") == "train")
tokens_per_step = out["config"]["global_batch"] * out["config"]["seq_len"]
startup = first["time"] - first["step"] * tokens_per_step / first["tokens_per_s"] - seen["t0"]
steps = max(r["step"] for r in rows if r.get("kind") == "train")
print("STARTUP " + json.dumps({"startup_s": round(startup, 2), "steps": steps, "wall_s": out["wall_s"]}))
"""


def side(root: Path, data: str, budget: float, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), data, str(budget), *overrides], cwd=root, env=env,
                          capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("STARTUP ")]
    if proc.returncode or not found:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"startup_since: the run in {root} failed (exit {proc.returncode})")
    return json.loads(found[-1][len("STARTUP "):])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="4bc177e", help="the earlier commit (default: 4bc177e)")
    parser.add_argument("--pairs", type=int, default=3, help="old/new runs, alternating (default: 3)")
    parser.add_argument("--budget", type=float, default=20.0, help="training seconds a run (default: 20)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the text file (default: tinyshakespeare)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"startup_since: {args.data} not found; pass --data PATH to a text file")
    data = str(Path(args.data).resolve())
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}"],
                      capture_output=True).returncode:
        raise SystemExit(f"startup_since: --rev {args.rev} is not a commit of the repository at {ROOT}")
    with tempfile.TemporaryDirectory(prefix="raylm-startup-") as tmp:
        old = Path(tmp, "old")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.rev], check=True)
        try:
            runs = []
            for i in range(args.pairs):
                pair = {"old": side(old, data, args.budget, args.overrides),
                        "new": side(ROOT, data, args.budget, args.overrides)}
                runs.append(pair)
                print(f"pair {i + 1}/{args.pairs}: {args.rev} {pair['old']['startup_s']} s, "
                      f"now {pair['new']['startup_s']} s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    old_s = statistics.median(p["old"]["startup_s"] for p in runs)
    new_s = statistics.median(p["new"]["startup_s"] for p in runs)
    out = {"benchmark": "startup_since", "rev": args.rev, "budget_s": args.budget, "cpu_count": os.cpu_count(),
           "runs": runs, "old_startup_s_median": old_s, "new_startup_s_median": new_s,
           "ratio": round(new_s / old_s, 3), "halved": new_s <= old_s / 2}
    from raylm.eval.results import finite  # non-finite figures as null: JSON has no NaN

    print(json.dumps(finite(out), indent=1, allow_nan=False))
    return out


if __name__ == "__main__":
    main()
