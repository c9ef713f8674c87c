"""Scored requests per second on one lm-eval task: raylm's actor pool against the harness's `hf` backend.

One run of this script times, on the same checkpoint and the same local task:
  raylm pool     `--model raylm` with --workers Ray actors of --cpus-per-worker CPUs (KV-cache
                 reuse across an item's choices, batches of similar length). The actors start
                 when the model object is built, so their start-up (a process, torch, the
                 weights) overlaps lm-eval building its requests; the driver scores units too
                 while it would only wait (raylm.eval.pool). Its clock includes all of that;
                 `pool_startup_s` is from building the model object until the last actor had
                 loaded the model, `driver_units` the units the driver scored itself
  raylm local    the same scoring in the driver process (workers=0)
  hf             lm-eval's own `hf` backend on the checkpoint exported to Hugging Face format
                 (raylm.export.hf.export_run), float32, --hf-batch-size
Each backend's `seconds` is building the model object (`init_s`: the model loaded, or for the
pool the driver's copy of a small model, the actors starting in the background) plus the
whole `simple_evaluate` call (`evaluate_s`), and `requests_per_s` divides the requests by it.
`loglikelihood_s` is the model's one `loglikelihood` call within it (for the pool, any wait
for actors included), where the backends differ; the rest of `evaluate_s` is lm-eval's own
work, the same for every backend. lm-eval's task index and the task's dataset are built once
before any clock starts. With --rounds N every backend runs N times, in alternating order,
and its fastest round is reported (`rounds_seconds` lists them all): on a shared machine the
fastest round is the least disturbed one.

The task is HellaSwag-shaped and local (nothing downloaded): --items items, each a context of
--context-words words from a document of raylm's built-in corpus and 4 endings of
--ending-words words, the true continuation (gold) and 3 spans of other documents, as local
jsonl behind a task YAML (`acc`, `acc_norm`).

    python benchmarks/eval_throughput.py --run runs/quickstart --workers 2 --rounds 2 \\
        --out benchmarks/results/cpu-eval-throughput.json

Without --run, the tiny test run (tests/tiny_run.py) is trained first (about 15 s). lm-eval's
`hf` backend needs `accelerate` (pip install accelerate). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.emit import run_and_emit  # noqa: E402

TASK = "raylm_bench_hellaswag"
ENDINGS = 4


def hellaswag_items(n: int, context_words: int, ending_words: int, seed: int = 7) -> list[dict]:
    """`n` items {context, choices, gold}: a document's words, its true next words and three
    spans of other documents of the built-in corpus."""
    from raylm.corpus import iter_builtin_documents

    need = context_words + ending_words
    # Prose only (the corpus also holds code and grammar rules): each document's plain words.
    docs = [[w for w in d.split() if re.fullmatch(r"[A-Za-z][a-z]{0,11}[,.]?", w)]
            for d in itertools.islice(iter_builtin_documents(), 2000)]
    docs = [d for d in docs if len(d) >= need]
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        d = rng.randrange(len(docs))
        start = rng.randrange(len(docs[d]) - need + 1)
        words = docs[d][start:start + need]
        choices = [" " + " ".join(words[context_words:])]
        while len(choices) < ENDINGS:
            o = rng.randrange(len(docs))
            if o == d:
                continue
            s = rng.randrange(len(docs[o]) - ending_words + 1)
            choices.append(" " + " ".join(docs[o][s:s + ending_words]))
        gold = rng.randrange(ENDINGS)
        choices[0], choices[gold] = choices[gold], choices[0]
        items.append({"context": " ".join(words[:context_words]), "choices": choices, "gold": gold})
    return items


def write_task(d: Path, items: list[dict]) -> str:
    (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (d / f"{TASK}.yaml").write_text(json.dumps({
        "task": TASK, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(d / "items.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return str(d)


def timed(make_model, manager, **kw) -> tuple[dict, object]:
    """Build the model object, then one `simple_evaluate`; the model's `loglikelihood` (the
    scoring itself, all requests in one call) is timed on its own too."""
    import lm_eval

    t0 = time.perf_counter()
    model = make_model()
    t1 = time.perf_counter()
    scoring = []
    score = model.loglikelihood

    def timed_loglikelihood(requests, *a, **k):
        s = time.perf_counter()
        out = score(requests, *a, **k)
        scoring.append(time.perf_counter() - s)
        return out

    model.loglikelihood = timed_loglikelihood  # lm-eval looks the method up on the instance
    out = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=manager, log_samples=False, **kw)
    t2 = time.perf_counter()
    metrics = out["results"][TASK]
    return {"seconds": round(t2 - t0, 2), "init_s": round(t1 - t0, 2), "evaluate_s": round(t2 - t1, 2),
            "loglikelihood_s": round(sum(scoring), 2),
            "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}, model


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="", help="run directory or checkpoint (default: train the tiny test run)")
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--context-words", type=int, default=12)
    p.add_argument("--ending-words", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every backend (alternating order); the fastest counts")
    p.add_argument("--skip", default="", help="comma-separated backends not to run: pool, local, hf")
    p.add_argument("--out", default="")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    # Checked before any work: a missing package otherwise ends the run with a traceback after
    # the other backends have run.
    needed = {"lm_eval": "lm-eval (pip install -e '.[eval]')"}
    if "hf" not in skip:
        needed.update(accelerate="accelerate (pip install accelerate), which lm-eval's hf backend needs",
                      transformers="transformers (pip install transformers)")
    missing = [what for module, what in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        p.error(f"not installed: {'; '.join(missing)}" + ("" if "hf" in skip else "; or pass --skip hf"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="raylm-eval-bench-"))
    # The task, the tiny run and the HF export (the size of --run's model) go when the process does.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    run = args.run
    if not run:
        from tests.tiny_run import make_tiny_run

        run = make_tiny_run(str(work))
    task_dir = write_task(work, hellaswag_items(args.items, args.context_words, args.ending_words))
    requests = args.items * ENDINGS

    import ray
    import torch
    from lm_eval.tasks import TaskManager

    from raylm.config import Config
    from raylm.eval.harness import RayLM
    from raylm.export.hf import export_run
    from raylm.pipeline import init_ray

    # lm-eval indexes its thousands of task YAMLs once, and the dataset's cache is built once,
    # outside every clock: a fixed cost that does not depend on the backend.
    manager = TaskManager(include_path=task_dir)
    manager.load([TASK])
    init_ray(Config())
    hf_dir = export_run(run, str(work / "hf")) if "hf" not in skip else ""

    def pool():
        out, lm = timed(lambda: RayLM(path=run, workers=args.workers, batch_tokens=args.batch_tokens,
                                      cpus_per_worker=args.cpus_per_worker), manager)
        out.update(lm.runner.timings[-1], pool_startup_s=lm.runner.startup_s())
        lm.runner.close()
        return out

    def local():
        return timed(lambda: RayLM(path=run, workers=0, batch_tokens=args.batch_tokens), manager)[0]

    def hf():
        from lm_eval.models.huggingface import HFLM

        return timed(lambda: HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=args.hf_batch_size),
                     manager)[0]

    backends = [(name, fn) for name, key, fn in (("raylm_pool", "pool", pool), ("raylm_local", "local", local),
                                                 ("hf", "hf", hf)) if key not in skip]
    runs: dict[str, list[dict]] = {name: [] for name, _ in backends}
    for r in range(args.rounds):
        # Every other round in reverse order: a machine whose load drifts favours no backend.
        for name, fn in (backends if r % 2 == 0 else backends[::-1]):
            runs[name].append(fn())
    # Each backend's fastest round: the one least disturbed by other work on the machine.
    results = {name: min(rs, key=lambda x: x["seconds"]) for name, rs in runs.items()}
    for name, rs in runs.items():
        if len(rs) > 1:
            results[name]["rounds_seconds"] = [x["seconds"] for x in rs]
    for r in results.values():
        # null where a time rounds to 0.00 s (a few requests on a small model): no rate to give.
        r["requests_per_s"] = round(requests / r["seconds"], 1) if r["seconds"] else None
        r["scoring_requests_per_s"] = round(requests / r["loglikelihood_s"], 1) if r["loglikelihood_s"] else None
    ray.shutdown()
    ratios = {}
    if "raylm_pool" in results and "hf" in results:
        ratios["pool_speedup_vs_hf"] = round(results["hf"]["seconds"] / results["raylm_pool"]["seconds"], 2)
    if "raylm_local" in results and "hf" in results:
        ratios["local_speedup_vs_hf"] = round(results["hf"]["seconds"] / results["raylm_local"]["seconds"], 2)
    return {"benchmark": "eval_throughput",
            "task": f"HellaSwag-shaped multiple choice ({ENDINGS} endings, {args.context_words}-word contexts, "
                    f"{args.ending_words}-word endings)",
            "requests": requests, **results, **ratios,
            "settings": {"run": args.run or "tests/tiny_run.py, trained by the benchmark", "items": args.items,
                         "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                         "batch_tokens": args.batch_tokens, "hf_batch_size": args.hf_batch_size,
                         "rounds": args.rounds,
                         "driver_torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                         "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "out": args.out}}


if __name__ == "__main__":
    run_and_emit(main)
