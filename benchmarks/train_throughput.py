"""Training throughput and MFU: raylm's training step against Hugging Face's Llama, side by side.

One process, one device, one invocation measures both:

* raylm: `train_step` on `build_parallel_model` inside a one-process group
  (`init_local_process_group`), so FSDP2 with its bf16 MixedPrecisionPolicy is exactly the
  path a Ray Train worker runs; per-block `torch.compile`, fused AdamW (`make_optimizer`), and
  the chunked cross-entropy of `raylm.losses`. Precision, compile and the loss chunking are
  `raylm pretrain`'s own defaults for the device (`Config.for_device`: on for CUDA, off for
  CPU), unless a flag overrides one, so the figures describe what a default run gets.
* the peer: transformers' `LlamaForCausalLM` of the same shape (`raylm.hf.hf_llama_config`)
  with fp32 weights under bf16 autocast, `torch.compile` of the whole model, fused AdamW and
  the loss from `labels`; both clip gradients at 1.0.

Both start from the same weights (raylm's init, loaded into the peer with
`raylm.hf.to_hf_state_dict`) and see the same batches, so the benchmark can check that the two
compute the same thing, and reports it (`parity_ok`): the first step's loss, and every
parameter's gradient on the first micro-batch (taken before warm-up, untimed). The gradients
are the sensitive part: at init the logits are nearly uniform, so the loss is ~ln(vocab)
whatever the model does (a wrong RoPE base moves it by 1e-5), while the gradients differ by
O(1). Batches are random tokens: throughput does not depend on their values.

On one H100 (the two goal shapes; add --profile DIR for a trace of raylm's step). Goals:
gpt2-124m >= 46% MFU and >= 1.35x the peer's tokens/s; 1b >= 52% MFU and >= 1.15x:

    python benchmarks/train_throughput.py --preset gpt2-124m --seq-len 1024 --micro-batch 16 \\
        --out benchmarks/results/h100-train-124m.json
    python benchmarks/train_throughput.py --preset 1b --seq-len 2048 --micro-batch 4 \\
        --out benchmarks/results/h100-train-1b.json

The issue's other figures come from two sibling benchmarks: the same step through Ray Train
with Ray Data (benchmarks/ray_overhead.py, goal >= 0.97x the bare step) and generation speed
(benchmarks/decode_throughput.py, goal >= 1,500 tokens/s at batch 1):

    python benchmarks/ray_overhead.py --preset gpt2-124m --seq-len 1024 --micro-batch 16 \\
        --global-batch 16 --out benchmarks/results/h100-ray-overhead-124m.json
    python benchmarks/decode_throughput.py --preset gpt2-124m --out benchmarks/results/h100-decode-eager.json
    python benchmarks/decode_throughput.py --preset gpt2-124m --compile \\
        --out benchmarks/results/h100-decode-compiled.json

float8 (torchao) is a switch, measured separately at the shape where it can pay off:

    python benchmarks/train_throughput.py --preset 1b --seq-len 2048 --micro-batch 4 --float8 \\
        --out benchmarks/results/h100-train-1b-float8.json

CPU smoke test (tiny shapes; the numbers mean nothing, the parity check does):

    python benchmarks/train_throughput.py --device cpu --preset tiny --seq-len 64 --micro-batch 2 \\
        --warmup 1 --steps 2 --dtype fp32

Prints one JSON object on stdout (progress goes to stderr); --out also writes it to a file.
Tokens/s counts trained tokens (micro-batch x seq-len x grad-accum per step); MFU uses
`raylm.metrics` (6N + 12 L d T FLOPs per token against the device's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import os
import sys
import time

import torch
import torch.distributed as dist

from raylm.config import (MODEL_PRESETS, PRESET_TOKENIZER_VOCAB, Config, ModelConfig, TrainConfig,
                          device_defaults, load_config)
from raylm.hf import to_hf_state_dict
from raylm.metrics import flops_per_token, mfu, peak_flops
from raylm.model import count_params
from raylm.parallel import build_parallel_model, init_local_process_group
from raylm.train import NextTokenObjective, device_name, make_optimizer, train_step

LR, GRAD_CLIP = 3e-4, 1.0
N_BATCHES = 4  # distinct batches, cycled through the steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train.precision; auto: bf16 on CUDA, fp32 elsewhere (raylm.config.device_defaults)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train.compile for raylm's blocks and the peer model (default: raylm's, on for CUDA)")
    p.add_argument("--chunked-ce", action=argparse.BooleanOptionalAction, default=None,
                   help="raylm's loss via raylm.losses' chunked cross-entropy (default: raylm's, on for CUDA)")
    p.add_argument("--ce-chunk", type=int, default=None,
                   help="rows of logits per chunk (default: train.loss_chunk_size's for the device)")
    p.add_argument("--float8", action="store_true",
                   help="raylm with train.float8 (torchao float8 linears in the blocks; needs torchao)")
    p.add_argument("--skip-peer", action="store_true", help="measure raylm only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="write a torch.profiler trace and op table of 3 raylm steps to DIR")
    args = p.parse_args(argv)
    # 0 steps ended in a division by zero; 0 tokens a step printed figures of no work done.
    for flag in ("steps", "micro_batch", "grad_accum", "seq_len"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    tc = resolved_config(args).train
    args.compile, args.chunked_ce = tc.compile, tc.loss_chunk_size > 0
    args.ce_chunk = tc.loss_chunk_size
    return args


def resolved_config(args) -> Config:
    """The config `raylm pretrain model.preset=<preset>` trains with on this device, with the
    flags that were given applied as the same overrides a user would write."""
    overrides = [f"model.preset={args.preset}", f"train.precision={args.dtype}", f"train.float8={args.float8}"]
    if args.compile is not None:
        overrides.append(f"train.compile={args.compile}")
    if args.chunked_ce is False:
        overrides.append("train.loss_chunk_size=0")
    elif args.ce_chunk is not None:
        overrides.append(f"train.loss_chunk_size={args.ce_chunk}")
    elif args.chunked_ce:  # on without a size: the size "auto" picks on CUDA
        overrides.append(f"train.loss_chunk_size={device_defaults('cuda')['loss_chunk_size']}")
    return load_config(None, overrides).for_device(torch.device(args.device).type)


def model_config(preset: str, seq_len: int) -> ModelConfig:
    cfg = MODEL_PRESETS[preset]
    if cfg.vocab_size == 0:  # resolved from a tokenizer in real runs: the one the preset was designed for
        cfg = cfg.with_vocab(PRESET_TOKENIZER_VOCAB.get(preset, 4096))
    if seq_len > cfg.max_seq_len:  # only the RoPE table grows; the parameters do not change
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    return cfg


def make_batches(cfg: ModelConfig, args, device) -> list[list[dict]]:
    """N_BATCHES optimizer steps of grad_accum micro-batches, (micro_batch, seq_len + 1) tokens each."""
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.micro_batch, args.seq_len + 1)
    return [[{"tokens": torch.randint(0, cfg.vocab_size, shape, generator=g).to(device)}
             for _ in range(args.grad_accum)] for _ in range(N_BATCHES)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_grads(named_parameters) -> dict[str, torch.Tensor]:
    """Gradients by parameter name, unsharded, fp32, on CPU; compile/checkpoint wrappers'
    name parts removed so the names are the plain model's."""
    out = {}
    for name, p in named_parameters:
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.replace("._orig_mod", "").replace("._checkpoint_wrapped_module", "")] = g.detach().float().cpu()
    return out


def measure(step, args, device, tokens_per_step: int, cfg: ModelConfig, dev_name: str) -> dict:
    """Run warm-up then timed steps of `step(i) -> (loss, grad_norm)`; throughput and memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**30 if cuda else None  # weights (and anything left over)
    out = []
    for i in range(args.warmup):
        out.append(step(i))
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        out.append(step(i))
    sync(device)
    seconds = time.perf_counter() - t0
    losses = [float(loss) for loss, _ in out]
    tok_s = tokens_per_step * args.steps / seconds
    return {
        "tokens_per_s": tok_s,
        "step_time_s": seconds / args.steps,
        "mfu": mfu(tok_s, cfg, args.seq_len, dev_name),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "memory_before_gib": before,
        "first_loss": losses[0],
        "losses": losses,
        "grad_norms": [float(g) for _, g in out],
    }


def peer_wanted(args) -> bool:
    return not args.skip_peer and importlib.util.find_spec("transformers") is not None


def run_raylm(cfg, args, device, precision, batches, dev_name, tokens_per_step):
    """raylm's step as a Ray Train worker runs it. Returns (result, initial full weights on
    CPU, first-micro-batch gradients under HF names), the last two None without a peer."""
    model = build_parallel_model(cfg, device, precision, args.seed, compile=args.compile, float8=args.float8)
    initial = None
    if peer_wanted(args):
        from raylm.checkpoint import full_model_state

        # Before any update: the peer starts from these weights (fp32 masters, CPU copy).
        initial = {k: v.clone() for k, v in full_model_state(model).items()}
    optimizer = make_optimizer(model, TrainConfig(lr=LR, grad_clip=GRAD_CLIP), device)
    objective = NextTokenObjective(chunk_size=args.ce_chunk if args.chunked_ce else 0)
    grads = None
    if peer_wanted(args):  # the parity probe: mean loss of the first micro-batch, backward, keep grads
        mb = batches[0][0]
        (objective.loss_sum(model, mb) / objective.count(mb)).backward()
        grads = to_hf_state_dict(cfg, full_grads(model.named_parameters()))
        model.zero_grad(set_to_none=True)
    skipped = []

    def step(i):
        stats = train_step(model, optimizer, batches[i % len(batches)], objective, LR, GRAD_CLIP)
        skipped.append(stats.skipped)
        return stats.loss, stats.grad_norm

    result = measure(step, args, device, tokens_per_step, cfg, dev_name)
    result["skipped_steps"] = sum(skipped)  # a non-finite step skips the optimizer: must be 0
    if args.profile:
        result["profile"] = profile_steps(step, args.profile, device)
    del model, optimizer
    return result, initial, grads


def profile_steps(step, out_dir: str, device: torch.device) -> dict:
    """A chrome trace (open in Perfetto) and the top ops by self time, for 3 warmed-up steps."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(3):
            step(i)
        sync(device)
    trace, table = os.path.join(out_dir, "raylm_trace.json"), os.path.join(out_dir, "raylm_top_ops.txt")
    prof.export_chrome_trace(trace)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(table, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=50))
    return {"trace": trace, "top_ops": table}


def run_peer(cfg, args, device, precision, batches, initial, dev_name, tokens_per_step):
    """transformers' Llama, trained the way its users get the most from it on one device."""
    import transformers

    from raylm.hf import hf_llama_config

    config = transformers.LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).float()
    model.load_state_dict({k: v.to(device) for k, v in to_hf_state_dict(cfg, initial).items()}, strict=True)
    model.train()
    fused = device.type == "cuda"
    params = list(model.parameters())  # shared (tied) parameters appear once
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=fused,
                                  foreach=None if fused else True)
    forward = torch.compile(model) if args.compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    # Inputs and targets split once, outside the timed loop (HF's loss needs contiguous targets).
    pairs = [[(mb["tokens"][:, :-1].contiguous(), mb["tokens"][:, 1:].contiguous()) for mb in micro]
             for micro in batches]

    def loss_of(x, y):
        with autocast():
            # shift_labels: y is already aligned with x, as raylm's targets are, so both
            # score the same seq_len targets per row (labels alone would drop the last).
            return forward(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss

    loss_of(*pairs[0][0]).backward()  # the parity probe, as in run_raylm
    grads = full_grads(model.named_parameters())
    model.zero_grad(set_to_none=True)

    def step(i):
        micro = pairs[i % len(pairs)]
        total = torch.zeros((), device=device)
        for x, y in micro:
            loss = loss_of(x, y)
            (loss / len(micro)).backward()
            total += loss.detach() / len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    result = measure(step, args, device, tokens_per_step, cfg, dev_name)
    result["transformers"] = transformers.__version__
    del model, forward, optimizer
    return result, grads


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolved_config(args).train.precision
    cfg = model_config(args.preset, args.seq_len)
    dev_name = device_name(device)
    tokens_per_step = args.micro_batch * args.seq_len * args.grad_accum
    batches = make_batches(cfg, args, device)
    report = {
        "benchmark": "train_throughput",
        "device": dev_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {**vars(args), "precision": precision, "tokens_per_step": tokens_per_step,
                     "lr": LR, "grad_clip": GRAD_CLIP},
        "model": dataclasses.asdict(cfg),
        "params": count_params(cfg),
        "params_non_embedding": count_params(cfg, non_embedding=True),
        "flops_per_token": flops_per_token(cfg, args.seq_len),
        "peak_flops": peak_flops(dev_name),
    }
    init_local_process_group(device)
    try:
        print(f"raylm: {args.preset}, {precision}, compile={args.compile}, chunked_ce={args.chunked_ce}",
              file=sys.stderr)
        report["raylm"], initial, raylm_grads = run_raylm(cfg, args, device, precision, batches, dev_name,
                                                          tokens_per_step)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the peer's peak memory must not include raylm's blocks
        report["peer"] = None
        if args.skip_peer:
            report["peer_skipped"] = "--skip-peer"
        elif not peer_wanted(args):
            report["peer_skipped"] = "transformers is not installed (pip install transformers)"
            print(f"WARNING: peer skipped: {report['peer_skipped']}", file=sys.stderr)
        else:
            print("peer: transformers LlamaForCausalLM", file=sys.stderr)
            report["peer"], peer_grads = run_peer(cfg, args, device, precision, batches, initial, dev_name,
                                                  tokens_per_step)
            report["transformers"] = report["peer"]["transformers"]
            report.update(parity(report["raylm"], report["peer"], raylm_grads, peer_grads, cfg, precision,
                                  args.float8))
            report["ratio_tokens_per_s"] = report["raylm"]["tokens_per_s"] / report["peer"]["tokens_per_s"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return report


def parity(raylm: dict, peer: dict, raylm_grads: dict, peer_grads: dict, cfg: ModelConfig,
           precision: str, float8: bool = False) -> dict:
    """Same weights, same batch: the first loss and every parameter's gradient must agree, to
    fp32 rounding in fp32 and to bf16 rounding (the two cast in different places) in bf16.
    With --float8 raylm's block matmuls round to 3 mantissa bits (e4m3) and its gradients to
    2 (e5m2), so the check only asks that they are the same computation to that precision."""
    loss_tol, grad_tol = (1e-4, 1e-3) if precision == "fp32" else (5e-3, 0.05)
    if float8:
        loss_tol, grad_tol = 2e-2, 0.25
    loss_rel = abs(raylm["first_loss"] - peer["first_loss"]) / abs(peer["first_loss"])
    grad_rel = {}
    for name, g in raylm_grads.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # an alias of the embedding; the peer lists a tied parameter once
        other = peer_grads.get(name)
        grad_rel[name] = float("inf") if other is None else float((g - other).norm() / other.norm().clamp(min=1e-30))
    worst = max(grad_rel, key=grad_rel.get)
    ok = loss_rel <= loss_tol and grad_rel[worst] <= grad_tol
    if not ok:
        print(f"WARNING: raylm and the peer disagree at step 0 (loss rel diff {loss_rel:.2e}, gradient of "
              f"{worst} rel diff {grad_rel[worst]:.2e}): they are not computing the same thing", file=sys.stderr)
    return {"parity_ok": ok, "first_loss_raylm": raylm["first_loss"], "first_loss_peer": peer["first_loss"],
            "first_loss_rel_diff": loss_rel, "loss_tolerance": loss_tol,
            "grad_rel_diff_max": grad_rel[worst], "grad_rel_diff_worst_param": worst, "grad_tolerance": grad_tol,
            "params_compared": len(grad_rel)}


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
