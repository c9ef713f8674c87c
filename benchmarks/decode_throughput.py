"""Generation speed of raylm's decoder with its static KV cache: prefill, then one token a step.

For each batch size: a random prompt is prefilled into `model.make_caches(batch, max_len)`,
then --new-tokens greedy steps each feed one token per sequence through
`raylm.generate.last_logits` with the position as a 0-d device tensor: every decode step has
the same shapes, so `--compile` (`raylm.generate.compile_decode_step`: torch.compile with
mode="reduce-overhead", fullgraph, dynamic=False) captures it once as a CUDA graph and replays
it. Reported: decode tokens/s (batch x decode steps / decode time), milliseconds per decode
step, prefill tokens/s, peak memory; with --compile, how many graphs dynamo compiled (2 per
batch size: the prefill and the decode step; more means per-step recompilation) and the
largest logit difference from the eager step on the same inputs (`parity`). Weights are
random: speed does not depend on them. Each batch size runs once untimed first
(compilation, graph capture, allocator warm-up), then timed.

The issue's goal (GPT-2-124M shape, one H100): at least 1,500 tokens/s at batch 1. On one
CUDA GPU, bf16, eager and compiled:

    python benchmarks/decode_throughput.py --preset gpt2-124m --out benchmarks/results/h100-decode-eager.json
    python benchmarks/decode_throughput.py --preset gpt2-124m --compile \\
        --out benchmarks/results/h100-decode-compiled.json

CPU smoke test (the numbers mean nothing):

    python benchmarks/decode_throughput.py --device cpu --preset tiny --new-tokens 8 [--compile]

Prints one JSON object on stdout (progress and compiler warnings go to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from raylm.config import MODEL_PRESETS, ModelConfig
from raylm.generate import compile_decode_step, last_logits
from raylm.model import build_model, count_params
from raylm.parallel import resolve_precision

PARITY_STEPS = 8  # decode steps compared between the compiled and the eager step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="weights and KV cache; auto: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help='torch.compile(mode="reduce-overhead") of the step: CUDA graphs on GPU')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        sizes = [0]
    if min(sizes) < 1:  # a batch of 0 ended in a reshape error from inside the model
        p.error(f"--batch-sizes {args.batch_sizes}: give whole numbers of at least 1, comma-separated")
    return args


def model_config(preset: str) -> ModelConfig:
    cfg = MODEL_PRESETS[preset]
    return cfg.with_vocab(4096) if cfg.vocab_size == 0 else cfg  # tokenizer-sized in real runs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(step, model, caches, prompt: torch.Tensor, new_tokens: int, device, graphs: bool) -> tuple[float, float]:
    """Greedy decoding; returns (prefill seconds, decode seconds). Tokens and the position stay
    on the device, so the host never waits for a step: the timing is the device's (or the
    launch rate's)."""
    plen = prompt.shape[1]
    pos = torch.tensor(plen, device=device)
    sync(device)
    t0 = time.perf_counter()
    if graphs:  # each call is a new CUDA-graph generation: the previous step's outputs are dead
        torch.compiler.cudagraph_mark_step_begin()
    nxt = step(model, prompt, caches, 0).argmax(-1, keepdim=True)  # argmax outside: a fresh tensor
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        nxt = step(model, nxt, caches, pos).argmax(-1, keepdim=True)
        pos += 1
    sync(device)
    # The prefill produced the first new token; the loop the other new_tokens - 1.
    return t1 - t0, time.perf_counter() - t1


@torch.inference_mode()
def parity(step, model, caches, prompt: torch.Tensor, device, graphs: bool) -> dict:
    """Teacher-forced: the compiled and the eager step get the same prefill and the same
    PARITY_STEPS tokens (fewer if the cache ends first), each into its own cache; the largest
    logit difference between them."""
    own = model.make_caches(prompt.shape[0], caches[0].k.shape[2])
    worst, scale, plen = 0.0, 0.0, prompt.shape[1]
    n = min(PARITY_STEPS, caches[0].k.shape[2] - plen)
    g = torch.Generator().manual_seed(2)
    # (steps, B, 1): each step's input has the strides of the timed loop's (a column slice
    # would not, and dynamo guards on strides: a recompile, not the graph that was timed).
    feed = torch.randint(0, model.cfg.vocab_size, (n, prompt.shape[0], 1), generator=g).to(device)
    for i in range(n + 1):
        x, start = (prompt, 0) if i == 0 else (feed[i - 1], torch.tensor(plen + i - 1, device=device))
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        got = step(model, x, caches, start).float()
        want = last_logits(model, x, own, start).float()
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    # bf16 rounds differently in fused kernels: read the difference against the logits' scale.
    return {"steps": n, "max_abs_logit_diff": worst, "max_abs_logit": scale}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(args.dtype, device)
    cfg = model_config(args.preset)
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the "
                         f"{args.preset} preset's max_seq_len={cfg.max_seq_len}")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (one from the prefill, at least one decode step)")
    model = build_model(cfg, device, seed=args.seed).eval()
    if precision == "bf16":
        for p in model.parameters():  # parameters only: the RoPE tables stay fp32
            p.data = p.data.to(torch.bfloat16)
    # CUDA graphs replay a step's kernels with one launch: at batch 1 a decode step is launch-bound.
    step = compile_decode_step() if args.compile else last_logits
    graphs = args.compile and device.type == "cuda"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.compile:  # two graphs per batch size must fit, or dynamo falls back to eager unannounced
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(batch_sizes))
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for batch in batch_sizes:
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g).to(device)
        # One cache for both passes: CUDA graphs bake in the cache's addresses (a new cache
        # would be re-recorded), and every position read is written earlier in the same pass.
        caches = model.make_caches(batch, args.prompt_len + args.new_tokens)
        print(f"batch {batch}: warm-up", file=sys.stderr)
        # CUDA graph trees run a graph's first call plainly and record on its second: the
        # prefill, called once a pass, is recorded in a second warm-up pass, not in the timed one.
        for _ in range(2 if graphs else 1):
            generate(step, model, caches, prompt, args.new_tokens, device, graphs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill_s, decode_s = generate(step, model, caches, prompt, args.new_tokens, device, graphs)
        steps = args.new_tokens - 1
        rows.append({
            "batch": batch,
            "decode_tokens_per_s": batch * steps / decode_s,
            "decode_ms_per_step": 1e3 * decode_s / steps,
            "prefill_tokens_per_s": batch * args.prompt_len / prefill_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        })
        if args.compile:  # after the timing: compiled and eager must compute the same step
            rows[-1]["parity"] = parity(step, model, caches, prompt, device, graphs)
    report = {
        "benchmark": "decode_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {**vars(args), "precision": precision},
        "model": dataclasses.asdict(cfg),
        "params": count_params(cfg),
        "results": rows,
    }
    if args.compile:  # how often dynamo compiled: 2 graphs per batch size; more means recompilation
        from torch._dynamo.utils import counters

        report["compile_stats"] = dict(counters["stats"])
        report["graphs_per_batch_size"] = counters["stats"]["unique_graphs"] / len(rows)
        # Inductor skips CUDA graphs (and says why on stderr) for, e.g., a mutated input it
        # does not know to be static: then the step is compiled but not graph-replayed.
        report["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    return report


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
