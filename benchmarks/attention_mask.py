"""Cost of document masking: a training step of packed rows, plain causal against block-causal.

Three variants of the same model (same weights, same batch), timed in one run and
interleaved step by step so that drift of a shared machine hits them alike:

  causal     plain causal SDPA, no document masking (the baseline: pre-training's path)
  sdpa_mask  `doc_sep=EOS`: per-token RoPE positions and a (B, 1, T, T) boolean block-causal
             mask through SDPA (raylm.model's default document-masking kernel)
  flex       the same with `doc_mask_kernel = "flex"`: FlexAttention with a BlockMask, blocks
             compiled (raylm.parallel.apply_compile), which it needs to be fused. Skipped,
             with the reason, where it cannot train (no FlexAttention backward on CPU).

A step is forward + backward of the mean next-token loss (no optimizer), the mask built
inside the step as training builds it. Rows are random tokens with an EOS after each token
with probability 1/--mean-doc-len (geometric document lengths). Reported per sequence
length: median and mean milliseconds per step, tokens/s, each masked variant's time over
the causal one, which masked variant is faster, and the largest logit difference between
the two masked variants on the first batch (they compute the same function).

Default shape: the `tiny` preset (dim 128, 4 layers, 4 heads) at batch 16, seq 128 and 512:

    python benchmarks/attention_mask.py                     # CPU, fp32
    python benchmarks/attention_mask.py --device cuda       # bf16 parameters; adds flex
    python benchmarks/attention_mask.py --device cuda --compile --n-kv-heads 1

Prints one JSON object on stdout (progress and compiler warnings go to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import replace

import torch

from raylm.config import MODEL_PRESETS
from raylm.model import build_model, count_params, document_positions
from raylm.parallel import apply_compile, resolve_precision

EOS = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation)")
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    p.add_argument("--n-kv-heads", type=int, default=None, help="GQA: fewer kv heads than the preset's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-lens", default="128,512", help="comma-separated")
    p.add_argument("--mean-doc-len", type=float, default=64.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="parameters; auto: bf16 on CUDA, fp32 elsewhere (RoPE tables stay fp32)")
    p.add_argument("--compile", action="store_true", help="also compile the blocks of causal and sdpa_mask")
    p.add_argument("--skip-flex", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    for flag in ("steps", "batch"):  # 0 ended in a traceback (an empty median, an empty batch)
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flex_unsupported(device: torch.device) -> str | None:
    """Why FlexAttention cannot train here, or None: one tiny eager forward + backward."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q = torch.randn(1, 1, 128, 16, device=device, requires_grad=True)
        mask = create_block_mask(lambda b, h, i, j: j <= i, 1, None, 128, 128, device=device)
        flex_attention(q, q, q, block_mask=mask).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means "not on this device"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def make_batch(batch: int, seq: int, vocab: int, mean_doc_len: float, g: torch.Generator):
    rows = torch.randint(1, vocab, (batch, seq + 1), generator=g)
    rows[torch.rand(rows.shape, generator=g) < 1 / mean_doc_len] = EOS
    return rows[:, :-1], rows[:, 1:]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(args.dtype, device)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    cfg = MODEL_PRESETS[args.preset]
    cfg = cfg.with_vocab(2048) if cfg.vocab_size == 0 else cfg  # the tiny preset's tokenizer size
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, *seq_lens),
                  n_kv_heads=args.n_kv_heads if args.n_kv_heads is not None else cfg.n_kv_heads)

    variants = {"causal": None, "sdpa_mask": "sdpa", "flex": "flex"}  # name -> doc_mask_kernel
    skipped = {}
    if args.skip_flex:
        skipped["flex"] = "--skip-flex"
    elif (why := flex_unsupported(device)) is not None:
        skipped["flex"] = why
    models = {}
    for name, kernel in variants.items():
        if name in skipped:
            continue
        model = build_model(cfg, device, seed=args.seed)  # same seed: the same weights
        if precision == "bf16":
            for p in model.parameters():  # parameters only: the RoPE tables stay fp32
                p.data = p.data.to(torch.bfloat16)
        if kernel is not None:
            model.doc_mask_kernel = kernel
        if args.compile or kernel == "flex":
            apply_compile(model)
        models[name] = model
    doc_sep = {name: None if kernel is None else EOS for name, kernel in variants.items()}

    def step(name, tokens, targets) -> float:
        model = models[name]
        sync(device)
        t0 = time.perf_counter()
        _, loss = model(tokens, targets, doc_sep=doc_sep[name])
        loss.backward()
        sync(device)
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    g = torch.Generator().manual_seed(args.seed + 1)
    results = []
    for seq in seq_lens:
        tokens, targets = (t.to(device) for t in make_batch(args.batch, seq, cfg.vocab_size, args.mean_doc_len, g))
        doc_ids, _ = document_positions(tokens, EOS)
        parity = None
        if "flex" in models:
            with torch.no_grad():
                a = models["sdpa_mask"](tokens, doc_sep=EOS)[0].float()
                b = models["flex"](tokens, doc_sep=EOS)[0].float()
            parity = {"max_abs_logit_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max())}
        print(f"seq {seq}: warm-up", file=sys.stderr)
        for _ in range(args.warmup):
            for name in models:
                step(name, tokens, targets)
        times = {name: [] for name in models}
        for _ in range(args.steps):  # interleaved: drift of a shared machine hits every variant alike
            for name in models:
                times[name].append(step(name, tokens, targets))
        row = {"seq_len": seq, "docs_per_row": float((doc_ids[:, -1] + 1).float().mean()),
               "flex_vs_sdpa_mask": parity}
        for name, ts in times.items():
            med = statistics.median(ts)
            row[name] = {"step_ms_median": 1e3 * med, "step_ms_mean": 1e3 * statistics.fmean(ts),
                         "tokens_per_s": args.batch * seq / med}
        for name in ("sdpa_mask", "flex"):
            if name in row:
                row[name]["time_vs_causal"] = row[name]["step_ms_median"] / row["causal"]["step_ms_median"]
        masked = [n for n in ("sdpa_mask", "flex") if n in row]
        row["faster_masked"] = min(masked, key=lambda n: row[n]["step_ms_median"])
        results.append(row)
    return {
        "benchmark": "attention_mask",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {**vars(args), "precision": precision},
        "model": {k: v for k, v in dataclasses.asdict(cfg).items()
                  if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")},
        "params": count_params(cfg),
        "skipped": skipped,
        "results": results,
    }


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
