"""Load on the OpenAI-compatible server (`raylm serve`) against one-at-a-time `transformers`.

Starts the app for --run on a local Ray cluster (Serve on a free loopback port, one replica
with --threads CPUs and max_batch_size = --concurrency), then:

1. idle: --idle requests one at a time, streaming: time to first token (TTFT) of an idle server;
2. load: --requests streaming requests from --concurrency clients, each sending its next
   request when its previous one ends (a closed loop), with mixed prompt lengths (2-30 words:
   5-126 tokens with the tests' tiny run's 384-piece tokenizer) and output lengths (8-96 tokens,
   fewer where prompt and output would pass the context; greedy, so each output's length is
   known); requests/s,
   output tokens/s, p50/p95 TTFT, inter-token latency (ITL: the gaps between a request's
   streamed events, each of which may carry several tokens: under load the server sends a
   stream's tokens in fewer, larger events, see `serve.stream_event_interval_s` (raylm/config.py)),
   time per output token (TPOT: a request's time from its first token to its last over its
   tokens after the first), tokens per event, errors. TTFT is also split in two: `first_wave`, the first --concurrency
   requests, sent together to an idle server (a burst: the last of them waits for the
   others' admission), and `steady`, every later request, each sent while the other
   --concurrency - 1 clients are mid-request: the server under load;
3. baseline: the same requests one by one through `transformers` `generate` on the run's HF
   export (`raylm.export.hf.export_run`), each made to produce exactly as many tokens as the
   server did (min_new_tokens = max_new_tokens), once on 1 torch thread and once on --threads;
   the faster is the baseline (for a tiny model on a shared CPU, more threads can be slower).

Phases 1 and 2 alternate --rounds times (default 3) on the same server, and each figure pools
every round's requests: on a machine whose speed drifts, idle and load are then measured over
the same stretch of time, and a p95 rests on 3x the requests (one round's p95 over 48 steady
requests is its third slowest; on 2 quiet cores the same code gave steady-over-idle ratios
from 2.7 to 5.0 that way). `ttft_p95_load_over_idle_by_round` keeps each round's own ratio.

Goals (issue 14): load output tokens/s >= 3x the baseline's at 16 concurrent requests on a
2-core CPU, and p95 TTFT under load within 2x the idle p95 TTFT. The JSON has the ratios
(`ttft_p95_load_over_idle`: steady load over idle; `ttft_p95_all_over_idle`: every load
request, first wave included) and the machine's load average, as the figures mean little on a
machine shared with other work (the clients, Serve's proxy and the replica share its cores).

CPU (this machine); without --run it first trains the tests' tiny run (tests/tiny_run.py, ~15 s)
in a temporary directory, which is what the README's figures use:

    python benchmarks/serve_load.py --concurrency 16 --requests 64 --threads 2
    python benchmarks/serve_load.py --run runs/quickstart-sft --concurrency 16 --requests 64 --threads 2

One CUDA GPU (the replica gets the GPU; the baseline runs transformers on it too):

    python benchmarks/serve_load.py --run runs/quickstart-sft --device cuda --concurrency 64 --requests 512 \\
        --out benchmarks/results/gpu-serve-load.json

Prints one JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emit import run_and_emit  # noqa: E402

WORDS = ("the cat sat on a mat while the quick brown fox jumped over lazy dogs in python we write code "
         "that reads data and trains models on ray clusters").split()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def make_requests(n: int, context: int, count_tokens, seed: int) -> list[dict]:
    """Mixed prompt (2-30 words) and output (8-96 tokens) lengths, clipped to the context."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        max_tokens = min(rng.randint(8, 96), context - count_tokens(prompt))
        out.append({"prompt": prompt, "max_tokens": max_tokens})
    return out


def run_tokenizer(run: str):
    from raylm import checkpoint
    from raylm.generate import load_tokenizer, resolve_checkpoint, tokenizer_of

    ckpt = resolve_checkpoint(run)
    return load_tokenizer(tokenizer_of(ckpt, checkpoint.read_meta(ckpt)))


def stream_one(port: int, model: str, req: dict, key: str) -> dict:
    """One streaming completion: TTFT, token arrival times, completion tokens, error."""
    body = json.dumps({"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    times, usage, error, events = [], None, None, 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json",
                                                       "authorization": f"Bearer {key}"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}", "sent": t0}
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter() - t0)
            if chunk.get("choices"):
                events += 1
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        error = repr(e)
    if error or usage is None:
        return {"error": error or "no usage chunk", "sent": t0}
    n = usage["completion_tokens"]
    return {"ttft": times[0] if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tpot": (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None,
            "tokens": n, "events": events, "end": time.perf_counter() - t0, "sent": t0}


def run_server_phase(port, model, reqs, concurrency, key) -> tuple[list[dict], float]:
    """Every request of `reqs` from `concurrency` client threads: (results, wall seconds)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: stream_one(port, model, r, key), reqs))
    return results, time.perf_counter() - start


def summarize(rounds: list[tuple[list[dict], float]], concurrency: int) -> dict:
    """One phase's figures over all its rounds, pooled: rates over the rounds' summed wall
    time, percentiles over every request of every round. Under load, each round's first
    `concurrency` requests (sent together to an idle server) are its `first_wave`, the rest
    `steady`."""
    results = [r for rs, _ in rounds for r in rs]
    wall = sum(w for _, w in rounds)
    ok = [r for r in results if "error" not in r]
    summary = {
        "rounds": len(rounds), "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
        "ttft_p95_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.95),
        "itl_p50_s": pct([x for r in ok for x in r["itl"]], 0.5),
        "itl_p95_s": pct([x for r in ok for x in r["itl"]], 0.95),
        "tpot_p50_s": pct([r["tpot"] for r in ok if r["tpot"] is not None], 0.5),
        "tpot_p95_s": pct([r["tpot"] for r in ok if r["tpot"] is not None], 0.95),
        "tokens_per_event": round(sum(r["tokens"] for r in ok) / max(1, sum(r["events"] for r in ok)), 2),
        "first_errors": [r["error"] for r in results if "error" in r][:3],
    }
    if concurrency > 1:
        waves: dict[str, list] = {"first_wave": [], "steady": []}
        for rs, _ in rounds:
            # The first `concurrency` requests go out together (pool.map starts one per client thread).
            # Split before failed requests are left out: a failed first-wave request must not
            # move a steady one into the first wave.
            by_sent = sorted(rs, key=lambda r: r.get("sent", float("inf")))
            waves["first_wave"] += [r for r in by_sent[:concurrency] if "error" not in r]
            waves["steady"] += [r for r in by_sent[concurrency:] if "error" not in r]
        for name, rs in waves.items():
            ttft = [r["ttft"] for r in rs if r["ttft"] is not None]
            summary[name] = {"requests": len(rs), "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95)}
    return summary


def run_baseline(run: str, reqs: list[dict], results: list[dict], device: str, threads: int) -> dict:
    """The same requests one by one through transformers.generate on the HF export, each
    producing as many tokens as the server produced for it: on 1 torch thread and on
    `threads`, the faster of the two being the baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.export.hf import export_run

    with tempfile.TemporaryDirectory(prefix="raylm-serve-bench-") as tmp:
        out = export_run(run, os.path.join(tmp, "hf"))
        model = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
        tok = AutoTokenizer.from_pretrained(out)
    runs = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        tokens, start = 0, time.perf_counter()
        with torch.no_grad():
            for req, res in zip(reqs, results):
                n = res.get("tokens") or req["max_tokens"]
                ids = torch.tensor([tok(req["prompt"], add_special_tokens=False)["input_ids"]], device=device)
                gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
                tokens += gen.shape[1] - ids.shape[1]
        wall = time.perf_counter() - start
        runs[t] = {"torch_threads": t, "requests": len(reqs), "output_tokens": tokens, "wall_s": round(wall, 3),
                   "output_tokens_per_s": round(tokens / wall, 1)}
    best = max(runs.values(), key=lambda r: r["output_tokens_per_s"])
    return {**best, "by_threads": list(runs.values())}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="", help="run or checkpoint directory (local or s3://); "
                                             "default: train the tests' tiny run in a temporary directory")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--idle", type=int, default=16, help="requests sent one at a time for the idle TTFT, each round")
    p.add_argument("--rounds", type=int, default=3,
                   help="idle and load phases alternate this many times; percentiles pool every round's requests")
    p.add_argument("--threads", type=int, default=2, help="CPUs for the replica, torch threads for the baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="serve.prefill_tokens_per_step (default: ServeConfig's)")
    p.add_argument("--stream-event-interval", type=float, default=None,
                   help="serve.stream_event_interval_s (default: ServeConfig's)")
    p.add_argument("--compile", action="store_true", help="serve.compile=true: torch.compile the decode step and the prefill")
    p.add_argument("--engine-thread", action="store_true",
                   help="serve.engine_process=false: the engine on a thread of the replica, not in a process of its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args()

    import torch
    from ray import serve

    from raylm.config import Config, ServeConfig
    from raylm.pipeline import init_ray, serve_ingress
    from raylm.serve.app import start
    from raylm.serve.local import free_port, wait_ready

    scratch = tempfile.TemporaryDirectory(prefix="raylm-serve-bench-run-")  # removed at exit
    run = args.run or tiny_run(scratch.name)
    key = "bench-" + os.urandom(8).hex()
    cfg = ServeConfig(port=free_port(), api_key=key, max_batch_size=args.concurrency,
                      max_ongoing_requests=2 * args.concurrency, max_queued_requests=-1, num_cpus=args.threads,
                      device=args.device, request_timeout_s=3600, compile=args.compile,
                      engine_process=not args.engine_thread,
                      **({"prefill_tokens_per_step": args.prefill_tokens} if args.prefill_tokens else {}),
                      **({"stream_event_interval_s": args.stream_event_interval}
                         if args.stream_event_interval is not None else {}))
    init_ray(Config())
    ingress = serve_ingress()  # "haproxy" unless RAYLM_SERVE_HAPROXY=0 (raylm.pipeline.serve_ingress_env)
    print(f"Serve's ingress: {ingress}", file=sys.stderr)
    url = start(run, cfg)
    wait_ready(url)
    info = json.loads(http_get(cfg.port, "/v1/models", key))["data"][0]
    model, tok = info["id"], run_tokenizer(run)
    load_before = os.getloadavg()
    try:
        reqs = make_requests(args.requests, info["max_model_len"], lambda p: len(tok.encode(p)), args.seed)
        stream_one(cfg.port, model, reqs[0], key)  # warm-up
        idle_rounds, load_rounds = [], []
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}: {args.idle} idle requests, then {args.requests} at "
                  f"concurrency {args.concurrency}", file=sys.stderr)
            idle_rounds.append(run_server_phase(cfg.port, model, (reqs * args.idle)[: args.idle], 1, key))
            load_rounds.append(run_server_phase(cfg.port, model, reqs, args.concurrency, key))
    finally:
        serve.shutdown()
    idle, load = summarize(idle_rounds, 1), summarize(load_rounds, args.concurrency)
    results = load_rounds[0][0]  # greedy: every round produced the same tokens
    result = {"settings": {**vars(args), "run": args.run or "the tests' tiny run (tests/tiny_run.py)",
                           "ingress": ingress, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                           "loadavg_before": [round(x, 1) for x in load_before],
                           "loadavg_after": [round(x, 1) for x in os.getloadavg()]},
              "idle": idle, "load": load}
    if not args.no_baseline:
        print("baseline: transformers generate, one request at a time", file=sys.stderr)
        result["baseline"] = run_baseline(run, reqs, results, args.device, args.threads)
        result["speedup_output_tokens_per_s"] = round(
            load["output_tokens_per_s"] / result["baseline"]["output_tokens_per_s"], 2)
    if idle["ttft_p95_s"] and load["ttft_p95_s"]:
        steady = load.get("steady", {}).get("ttft_p95_s")
        if steady:
            result["ttft_p95_load_over_idle"] = round(steady / idle["ttft_p95_s"], 2)
        result["ttft_p95_all_over_idle"] = round(load["ttft_p95_s"] / idle["ttft_p95_s"], 2)
        # Each round's own ratio: how far the pooled figure can be trusted on a shared machine.
        by_round = []
        for idle_r, load_r in zip(idle_rounds, load_rounds):
            i, l = summarize([idle_r], 1), summarize([load_r], args.concurrency).get("steady", {})
            if i["ttft_p95_s"] and l.get("ttft_p95_s"):
                by_round.append(round(l["ttft_p95_s"] / i["ttft_p95_s"], 2))
        result["ttft_p95_load_over_idle_by_round"] = by_round
    return result


def tiny_run(root: str) -> str:
    """The tests' tiny trained run (tests/tiny_run.py) under `root`."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny_run import make_tiny_run

    print(f"training the tests' tiny run in {root}", file=sys.stderr)
    return make_tiny_run(root)


def http_get(port: int, path: str, key: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"authorization": f"Bearer {key}"})
    data = conn.getresponse().read()
    conn.close()
    return data


if __name__ == "__main__":
    run_and_emit(main)
