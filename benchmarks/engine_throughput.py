"""Output tokens/s of the continuous-batching engine (raylm/serve/engine.py) at 1, 4 and 16
concurrent requests, against the same requests one by one through `raylm.generate.generate`.

The requests mix prompt lengths (--prompt-lens, drawn uniformly) and output lengths
(--new-tokens), sampled at temperature 1 with a seed each and no stop token, so both sides
produce the same number of tokens; each side runs once untimed on two requests first
(allocator warm-up). For each concurrency level the engine gets all --requests requests,
at most that many in flight at once (a new one starts when one ends, as clients do).
Reported per level: output tokens/s, its ratio to sequential `generate`, engine steps,
p50/p95 time to first token (and `steady`: the requests after the first `concurrency`, each
sent while the others run, as `serve_load.py` splits them), and how many requests' tokens equal `generate`'s (all of them,
unless a floating-point tie: see the engine's module docstring).

Without --run the model has random weights of --preset (speed does not depend on them) and a
512-piece tokenizer trained on the built-in corpus in a few seconds; with --run, a trained
run directory (local or s3://). On 2 CPU cores:

    python benchmarks/engine_throughput.py --preset tiny --out benchmarks/results/cpu-engine-tiny.json
    python benchmarks/engine_throughput.py --preset gpt2-124m --requests 16 --new-tokens 32,64

On one GPU add --device cuda (and --dtype bfloat16). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from raylm.config import MODEL_PRESETS
from raylm.generate import generate, load_for_inference
from raylm.model import build_model, count_params
from raylm.serve.engine import Engine, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", help="a trained run or checkpoint directory (default: random weights)")
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated")
    p.add_argument("--prompt-lens", default="8,96", help="min,max prompt tokens")
    p.add_argument("--new-tokens", default="32,96", help="min,max new tokens per request")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="the engine's prefill_tokens_per_step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.requests < 1:  # 0 ended in a traceback (the median of no times to first token)
        p.error(f"--requests {args.requests}: must be at least 1")
    return args


def load(args):
    if args.run:
        model, tok, _ = load_for_inference(args.run, device=args.device, dtype=args.dtype)
        return model, tok
    from raylm.corpus import iter_builtin_documents
    from raylm.tokenizer import train_tokenizer

    texts = list(itertools.islice(iter_builtin_documents(), 300))
    tok = train_tokenizer(texts, tempfile.mkdtemp(prefix="raylm-bench-tok-"), 512)
    cfg = MODEL_PRESETS[args.preset].with_vocab(tok.vocab_size)
    model = build_model(cfg, args.device, seed=args.seed).eval()
    if args.dtype:
        from raylm.generate import inference_dtype

        model.to(inference_dtype(args.dtype))
        model.init_buffers()  # RoPE tables back to fp32
    return model, tok


def make_requests(args, tok, limit: int) -> list[tuple[list[int], SamplingParams]]:
    from raylm.corpus import iter_builtin_documents

    rng = random.Random(args.seed)
    lo_p, hi_p = (int(x) for x in args.prompt_lens.split(","))
    lo_n, hi_n = (int(x) for x in args.new_tokens.split(","))
    pool = [t for d in itertools.islice(iter_builtin_documents(), 200) for t in tok.encode(d)]
    reqs = []
    for i in range(args.requests):
        n_new = rng.randint(lo_n, hi_n)
        plen = min(rng.randint(lo_p, hi_p), limit - n_new)
        start = rng.randrange(len(pool) - plen)
        reqs.append((pool[start:start + plen], SamplingParams(max_tokens=n_new, temperature=1.0, seed=i)))
    return reqs


def run_sequential(model, reqs) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = [generate(model, p, s.max_tokens, s.temperature, s.top_k, None, s.seed) for p, s in reqs]
    return time.perf_counter() - t0, outs


async def run_engine(engine: Engine, reqs, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    steady: list[float] = []  # requests after the first `concurrency`: sent while the others run
    entered = itertools.count()

    async def one(prompt, params):
        async with gate:
            k, t0, ids = next(entered), time.perf_counter(), []
            async for out in engine.generate(prompt, params):
                if not ids and out.token_ids:
                    ttft.append(time.perf_counter() - t0)
                    if k >= concurrency:
                        steady.append(ttft[-1])
                ids += out.token_ids
            return ids

    steps0 = engine.stats()["steps"]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(p, s) for p, s in reqs))
    wall = time.perf_counter() - t0
    ttft.sort()
    steady.sort()
    return {"wall_s": wall, "outs": outs, "steps": engine.stats()["steps"] - steps0,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p95_ms": 1e3 * ttft[int(0.95 * (len(ttft) - 1))],
            "ttft_steady_p50_ms": 1e3 * statistics.median(steady) if steady else None,
            "ttft_steady_p95_ms": 1e3 * steady[int(0.95 * (len(steady) - 1))] if steady else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tok = load(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    reqs = make_requests(args, tok, model.cfg.max_seq_len)
    tokens = sum(s.max_tokens for _, s in reqs)

    run_sequential(model, reqs[:2])  # warm-up
    print(f"sequential generate: {len(reqs)} requests, {tokens} tokens", file=sys.stderr)
    seq_s, seq_outs = run_sequential(model, reqs)
    baseline = tokens / seq_s
    engine = Engine(model, tok, max_batch_size=max(levels), device=args.device,
                    prefill_tokens_per_step=args.prefill_tokens)
    rows = []
    try:
        asyncio.run(run_engine(engine, reqs[:2], 2))  # warm-up
        for c in levels:
            print(f"engine at concurrency {c}", file=sys.stderr)
            r = asyncio.run(run_engine(engine, reqs, c))
            got = sum(len(o) for o in r["outs"])
            rows.append({"concurrency": c, "output_tokens_per_s": got / r["wall_s"],
                         "vs_sequential_generate": got / r["wall_s"] / baseline, "wall_s": r["wall_s"],
                         "engine_steps": r["steps"], "tokens": got,
                         "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p95_ms": r["ttft_p95_ms"],
                         "ttft_steady_p50_ms": r["ttft_steady_p50_ms"], "ttft_steady_p95_ms": r["ttft_steady_p95_ms"],
                         "requests_equal_to_generate": sum(a == b for a, b in zip(r["outs"], seq_outs))})
    finally:
        asyncio.run(engine.close())
    return {
        "benchmark": "engine_throughput",
        "device": torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],  # other work on the machine skews every figure
        "settings": vars(args),
        "model": dataclasses.asdict(model.cfg),
        "params": count_params(model.cfg),
        "requests": len(reqs),
        "sequential_generate": {"output_tokens_per_s": baseline, "wall_s": seq_s, "tokens": tokens},
        "engine": rows,
    }


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
