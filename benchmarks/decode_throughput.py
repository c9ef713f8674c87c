"""Generation speed of raylm's decoder with its static KV cache: prefill, then one token a step.

For each batch size: a random prompt is prefilled into `model.make_caches(batch, max_len)`,
then --new-tokens greedy steps each feed one token per sequence (`model(x, caches=...,
start=pos)`). Reported: decode tokens/s (batch x new tokens / decode time), milliseconds per
decode step, prefill tokens/s, peak memory. Weights are random: speed does not depend on them.
Each batch size runs once untimed first (compilation, allocator warm-up), then timed.

    # one H100, bf16, eager and with CUDA graphs (torch.compile mode="reduce-overhead")
    python benchmarks/decode_throughput.py --preset gpt2-124m --out benchmarks/results/h100-decode-eager.json
    python benchmarks/decode_throughput.py --preset gpt2-124m --compile \\
        --out benchmarks/results/h100-decode-compiled.json
    # CPU smoke test
    python benchmarks/decode_throughput.py --device cpu --preset tiny --new-tokens 8

Prints one JSON object on stdout (progress and compiler warnings go to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from raylm.config import MODEL_PRESETS, ModelConfig
from raylm.model import build_model, count_params
from raylm.parallel import resolve_precision


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
                   help='torch.compile(mode="reduce-overhead"): CUDA graphs on GPU')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def model_config(preset: str) -> ModelConfig:
    cfg = MODEL_PRESETS[preset]
    return cfg.with_vocab(4096) if cfg.vocab_size == 0 else cfg  # tokenizer-sized in real runs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(forward, caches, prompt: torch.Tensor, new_tokens: int, device, graphs: bool) -> tuple[float, float]:
    """Greedy decoding; returns (prefill seconds, decode seconds). Tokens stay on the device,
    so the host never waits for a step: the timing is the device's (or the launch rate's)."""
    plen = prompt.shape[1]
    sync(device)
    t0 = time.perf_counter()
    if graphs:  # each call is a new CUDA-graph generation: the previous step's outputs are dead
        torch.compiler.cudagraph_mark_step_begin()
    logits, _ = forward(prompt, caches=caches, start=0)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t1 = time.perf_counter()
    for pos in range(plen, plen + new_tokens - 1):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, _ = forward(nxt, caches=caches, start=pos)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    # The prefill produced the first new token; the loop the other new_tokens - 1.
    return t1 - t0, time.perf_counter() - t1


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
    # Note: the cache returns k/v sliced to the current length, so every decode position is a
    # new shape and CUDA graphs record one graph per position during the warm-up pass, which
    # the timed pass (same positions) replays.
    forward = torch.compile(model, mode="reduce-overhead") if args.compile else model
    graphs = args.compile and device.type == "cuda"
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g).to(device)
        # One cache for both passes: CUDA graphs bake in the cache's addresses (a new cache
        # would be re-recorded), and every position read is written earlier in the same pass.
        caches = model.make_caches(batch, args.prompt_len + args.new_tokens)
        print(f"batch {batch}: warm-up", file=sys.stderr)
        generate(forward, caches, prompt, args.new_tokens, device, graphs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill_s, decode_s = generate(forward, caches, prompt, args.new_tokens, device, graphs)
        steps = args.new_tokens - 1
        rows.append({
            "batch": batch,
            "decode_tokens_per_s": batch * steps / decode_s,
            "decode_ms_per_step": 1e3 * decode_s / steps,
            "prefill_tokens_per_s": batch * args.prompt_len / prefill_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        })
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
    if args.compile:  # how often dynamo compiled: many graphs mean per-step recompilation
        from torch._dynamo.utils import counters

        report["compile_stats"] = dict(counters["stats"])
    return report


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
