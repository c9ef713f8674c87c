"""Scored requests per second on one lm-eval task: raylm's actor pool against the harness's `hf` backend.

One run of this script times, on the same checkpoint and the same local task:
  raylm pool     `--model raylm` with --workers Ray Data actors (KV-cache reuse across an
                 item's choices, batches of similar length); the clock includes starting the
                 actors and loading the model in each
  raylm local    the same scoring in the driver process (workers=0)
  hf             lm-eval's own `hf` backend on the checkpoint exported to Hugging Face format
                 (raylm.export.hf.export_run), float32, --hf-batch-size
The task is a multiple-choice task built from raylm.synthetic (`word_after`, --items items,
two choices each), written as local jsonl behind a task YAML: nothing is downloaded.

    python benchmarks/eval_throughput.py --run runs/quickstart --workers 2 \\
        --out benchmarks/results/cpu-eval-throughput.json

Without --run, the tiny test run (tests/tiny_run.py) is trained first (about 15 s). lm-eval's
`hf` backend needs `accelerate` (pip install accelerate). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.emit import run_and_emit  # noqa: E402


def write_task(d: Path, items: int) -> str:
    from raylm import synthetic as S

    rows = [{"context": e.prompt + " ->", "choices": [" " + e.answer, " " + e.wrong], "gold": 0}
            for e in S.examples("word_after", items, seed=7)]
    (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "bench_mc.yaml").write_text(json.dumps({
        "task": "raylm_bench_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(d / "items.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}", "target_delimiter": "", "metric_list": [{"metric": "acc"}]}))
    return str(d)


def timed(model, model_args, task_dir: str, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["raylm_bench_mc"],
                                  task_manager=TaskManager(include_path=task_dir), log_samples=False, **kw)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "acc": out["results"]["raylm_bench_mc"]["acc,none"]}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="", help="run directory or checkpoint (default: train the tiny test run)")
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="raylm-eval-bench-"))
    run = args.run
    if not run:
        from tests.tiny_run import make_tiny_run

        run = make_tiny_run(str(work))
    task_dir = write_task(work, args.items)
    requests = args.items * 2

    import ray

    from raylm.config import Config
    from raylm.eval.harness import RayLM
    from raylm.export.hf import export_run
    from raylm.pipeline import init_ray

    init_ray(Config())
    results = {"raylm_pool": timed(RayLM(path=run, workers=args.workers), None, task_dir),
               "raylm_local": timed(RayLM(path=run, workers=0), None, task_dir)}
    hf_dir = export_run(run, str(work / "hf"))
    results["hf"] = timed("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", task_dir,
                          batch_size=args.hf_batch_size)
    for r in results.values():
        r["requests_per_s"] = round(requests / r["seconds"], 1)
    ray.shutdown()
    return {"benchmark": "eval_throughput", "task": "word_after multiple choice (2 choices)",
            "requests": requests, **results,
            "pool_speedup_vs_hf": round(results["hf"]["seconds"] / results["raylm_pool"]["seconds"], 2),
            "settings": {"run": args.run or "tests/tiny_run.py, trained by the benchmark", "items": args.items, "workers": args.workers,
                         "hf_batch_size": args.hf_batch_size, "cpu_count": os.cpu_count(), "out": args.out}}


if __name__ == "__main__":
    run_and_emit(main)
