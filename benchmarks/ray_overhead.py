"""What Ray costs a training run: the bare step against the same run through Ray Train.

One invocation, one device, the same Config, data and seed throughout:

1. bare   `train_step` in a loop in this process, in a one-process group
          (`init_local_process_group`) with the model a one-worker Ray Train run builds (FSDP2
          and its bf16 policy for bf16; plain in fp32: `raylm.parallel.sharding_pays`); the
          batches are already on the device. The step
          benchmarks/train_throughput.py measures.
2. loop   `raylm.train.train_local`: the whole training loop (`fit`: schedule, logging, guards,
          data position) without Ray, batches copied from host memory each step. Skip it with
          --skip-loop. The difference between 1 and 2 is the loop's, not Ray's.
3. ray    `raylm.train_ray.run_ray_training` with one worker (`use_gpu` on CUDA): Ray Train starts
          the worker, builds the model as `bare` does, and Ray Data streams the prepared token blocks
          from parquet shards (`training_dataset`, `get_dataset_shard().iter_torch_batches`).
4. bare_after  run 1 again, once the Ray run has ended (--no-bare-after skips it).

The prepared dataset is random tokens written in raylm's prepared format (parquet shards of
seq_len + 1 blocks and a manifest, `raylm.packing.ShardWriter`): throughput does not depend on
the values, and the bare step sees the very blocks the Ray worker reads, in the same order,
with the same learning-rate schedule, so the final losses must agree (`same_training`).
Datasets under 256 MiB are normally read once by the driver and handed to Ray in memory;
--source parquet (the default) makes the worker stream the shards through read tasks, as
any real corpus does.

Timing: --warmup untimed steps (compilation happens there), then --steps timed ones. The
runs under `fit` log a metrics row every --steps steps (`train.log_every`), so the row at
the last step covers exactly the timed steps: its `tokens_per_s`, and the growth of
`data_wait_s` (time the loop waited for its next batch) since the previous row. Evaluation
and checkpoints happen only after the last step (one of each, untimed).

`ratio_ray_to_bare` is the Ray step against the mean of runs 1 and 4
(`ratio_ray_to_bare_before` and `_after` are each side's): on a machine whose speed drifts,
one bare measurement taken before the Ray run decided the ratio as much as Ray did.

The issues' goals (`goal_ratio`, by device): ray tokens/s >= 0.97 x bare tokens/s on one GPU,
and >= 0.95 x on a 2-core CPU for the tiny model (`ratio_ray_to_bare`).
On one H100:

    python benchmarks/ray_overhead.py --preset gpt2-124m --seq-len 1024 --micro-batch 16 \\
        --global-batch 16 --out benchmarks/results/h100-ray-overhead-124m.json
    python benchmarks/ray_overhead.py --preset 1b --seq-len 2048 --micro-batch 4 \\
        --global-batch 4 --out benchmarks/results/h100-ray-overhead-1b.json

CPU smoke test (tiny shapes; the numbers mean nothing, `same_training` does):

    python benchmarks/ray_overhead.py --device cpu --preset tiny --seq-len 32 --micro-batch 2 \\
        --global-batch 4 --warmup 2 --steps 2

Prints one JSON object on stdout (progress goes to stderr); --out also writes it to a file.
Starts a local Ray cluster unless RAY_ADDRESS names one (or this process already joined one).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from raylm import storage
from raylm.batches import val_set_rows
from raylm.config import MODEL_PRESETS, Config, DataConfig, TrainConfig
from raylm.metrics import flops_per_token, mfu, peak_flops
from raylm.model import count_params
from raylm.parallel import build_parallel_model, init_local_process_group, resolve_precision, sharding_pays
from raylm.train import NextTokenObjective, device_name, lr_at, make_optimizer, train_step
from train_throughput import model_config  # the shapes train_throughput.py measures (a sibling script)

# The issues' goals for Ray Train against the bare step's tokens/s: 0.97x on one GPU; on a
# small CPU, where Ray's own processes share the cores with training, 0.95x.
GOAL_RATIO = {"cuda": 0.97, "cpu": 0.95}


DEFAULTS = {
    "cuda": {"preset": "gpt2-124m", "seq_len": 1024, "global_batch": 16, "warmup": 20, "steps": 20},
    # The issue's CPU configuration, and the README's CPU figures: tiny, seq 128, 4,096 tokens a
    # step, 60 untimed and 60 timed steps.
    "cpu": {"preset": "tiny", "seq_len": 128, "global_batch": 32, "warmup": 60, "steps": 60},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults by device (DEFAULTS): on a CPU, the issue's tiny model (seq 128, 32 sequences a
    # step); gpt2-124m at seq 1024 would not fit a small machine's memory.
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="default: gpt2-124m on CUDA, tiny elsewhere")
    p.add_argument("--seq-len", type=int, help="default: 1024 on CUDA, 128 elsewhere")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--global-batch", type=int,
                   help="sequences per optimizer step (a multiple of --micro-batch: gradient accumulation); "
                        "default: 16 on CUDA, 32 elsewhere")
    p.add_argument("--warmup", type=int,
                   help="untimed steps first; rounded up to a multiple of --steps (the logging interval); "
                        "default: 20 on CUDA, 60 elsewhere")
    p.add_argument("--steps", type=int, help="timed steps; default: 20 on CUDA, 60 elsewhere")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train.precision; auto: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train.compile (default: on for CUDA)")
    p.add_argument("--ce-chunk", type=int, default=None,
                   help="train.loss_chunk_size (default: 2048 on CUDA, 0 elsewhere)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="train.cpus_per_worker; also the thread count of the runs in this process "
                        "(default: what train.cpus_per_worker=auto gives one worker: this machine's cores, "
                        "1 on CUDA)")
    p.add_argument("--source", choices=["parquet", "memory"], default="parquet",
                   help="parquet: the worker streams the shards through Ray Data read tasks (as real "
                        "corpora do); memory: small-dataset path, blocks handed to Ray by the driver")
    p.add_argument("--skip-loop", action="store_true", help="skip run 2 (the loop without Ray)")
    p.add_argument("--bare-after", action=argparse.BooleanOptionalAction, default=True,
                   help="time the bare step again after the Ray run; the ratio is then against the mean "
                        "of the two (default: on)")
    p.add_argument("--work-dir", default="", help="prepared data and run directories (default: a temporary "
                                                  "directory, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    for flag, value in (("--micro-batch", args.micro_batch), ("--steps", args.steps)):
        if value is not None and value < 1:  # 0 ended in a division by zero
            p.error(f"{flag} {value}: must be at least 1")
    cuda = torch.device(args.device).type == "cuda"
    for key, value in DEFAULTS["cuda" if cuda else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile = cuda if args.compile is None else args.compile
    args.ce_chunk = (2048 if cuda else 0) if args.ce_chunk is None else args.ce_chunk
    if args.cpus_per_worker is None:
        one = dataclasses.replace(TrainConfig(), num_workers=1, use_gpu=cuda)
        args.cpus_per_worker = one.resolve_workers(os.cpu_count() or 1, gpus=1 if cuda else 0).cpus_per_worker
    if args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    args.warmup = args.steps * max(1, math.ceil(args.warmup / args.steps))
    return args


def run_config(args, work_dir: str) -> Config:
    """The one Config all three runs use."""
    cuda = torch.device(args.device).type == "cuda"
    max_steps = args.warmup + args.steps
    train = dataclasses.replace(
        TrainConfig(), num_workers=1, use_gpu=cuda, cpus_per_worker=args.cpus_per_worker,
        micro_batch_size=args.micro_batch, global_batch_size=args.global_batch, max_steps=max_steps,
        precision=args.dtype, compile=args.compile, loss_chunk_size=args.ce_chunk,
        # A row every --steps steps (warm-up is a multiple): the last covers the timed steps only.
        log_every=args.steps,
        # Evaluation and the checkpoint only after the last (timed) step.
        eval_every=max_steps, eval_batches=1, ckpt_every=max_steps, keep_checkpoints=1)
    data = dataclasses.replace(DataConfig(), seq_len=args.seq_len)
    return Config(name="ray", storage=os.path.join(work_dir, "runs"), seed=args.seed,
                  model=model_config(args.preset, args.seq_len), data=data, train=train).validate()


# --------------------------------------------------------------------------- data


def write_prepared_dataset(out: str, cfg: Config, train_blocks: np.ndarray, val_blocks: np.ndarray) -> dict:
    """Random blocks in raylm's prepared format: parquet shards and a manifest, written last."""
    from raylm.data import FORMAT_VERSION, MANIFEST
    from raylm.packing import ShardWriter

    block_len = cfg.data.seq_len + 1
    splits = {}
    for split, blocks in (("train", train_blocks), ("val", val_blocks)):
        writer = ShardWriter(out, split, block_len, cfg.data.blocks_per_shard, None)
        for b in blocks:
            writer.add(b)
        writer.flush()
        splits[split] = {"blocks": writer.blocks, "shards": writer.shards}
    key = hashlib.sha256(train_blocks.tobytes() + val_blocks.tobytes()).hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "seed": cfg.seed, "seq_len": cfg.data.seq_len,
        "tokenizer_sha256": "", "vocab_size": cfg.model.vocab_size, "eos_id": 0,
        "sources": [], "val_sources": [], "files": [], **splits,
        "config": {"random_tokens": True}, "stats": {},
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def random_blocks(cfg: Config, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.model.vocab_size, (n, cfg.data.seq_len + 1), dtype=np.int32)


# --------------------------------------------------------------------------- the three runs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bare(cfg: Config, blocks: np.ndarray, args, device, dev_name: str) -> dict:
    """train_step on device-resident batches: step i takes blocks [i G, (i+1) G) in micro-batches
    of rows [a m, (a+1) m), exactly what RankBatches gives one worker, at lr_at(i)."""
    tc = cfg.train
    precision = resolve_precision(tc.precision, device)
    model = build_parallel_model(cfg.model, device, precision, cfg.seed, compile=tc.compile,
                                 activation_checkpointing=tc.activation_checkpointing,
                                 reshard_after_forward=tc.reshard_after_forward, float8=tc.float8,
                                 shard=sharding_pays(precision))
    optimizer = make_optimizer(model, tc, device)
    objective = NextTokenObjective(tc.z_loss, tc.loss_chunk_size)
    G, m = tc.global_batch_size, tc.micro_batch_size
    batches = [[{"tokens": torch.as_tensor(blocks[i * G + a * m:i * G + (a + 1) * m]).to(device, torch.long)}
                for a in range(G // m)] for i in range(tc.max_steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []

    def step(i):
        # The loop re-seeds at every step; the model draws nothing, but the cost is the loop's too.
        torch.manual_seed(cfg.seed * 1_000_003 + i * 1_009)
        stats = train_step(model, optimizer, batches[i], objective, lr_at(i, tc), tc.grad_clip)
        losses.append(stats.loss)

    for i in range(args.warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, tc.max_steps):
        step(i)
    sync(device)
    seconds = time.perf_counter() - t0
    tok_s = G * cfg.data.seq_len * args.steps / seconds
    result = {"tokens_per_s": tok_s, "step_time_s": seconds / args.steps,
              "mfu": mfu(tok_s, cfg.model, cfg.data.seq_len, dev_name),
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "last_loss": losses[-1], "losses": losses}
    del model, optimizer, batches
    return result


def metrics_rows(run_dir: str) -> list[dict]:
    text = storage.read_text(storage.join(run_dir, "metrics.jsonl"))
    return [r for r in map(json.loads, filter(str.strip, text.splitlines())) if r.get("kind") == "train"]


def timed_window(cfg: Config, args, rows: list[dict], dev_name: str, wall_s: float) -> dict:
    """The row at the last step covers the timed steps; data wait is the growth since the row before."""
    by_step = {r["step"]: r for r in rows}
    end, start = by_step.get(cfg.train.max_steps), by_step.get(args.warmup)
    if end is None or start is None:
        raise RuntimeError(f"{cfg.run_dir}/metrics.jsonl has no train rows at steps {args.warmup} and "
                           f"{cfg.train.max_steps} (found {sorted(by_step)})")
    step_time = cfg.train.global_batch_size * cfg.data.seq_len / end["tokens_per_s"]
    wait = end["data_wait_s"] - start["data_wait_s"]
    return {"tokens_per_s": end["tokens_per_s"], "step_time_s": step_time,
            "mfu": mfu(end["tokens_per_s"], cfg.model, cfg.data.seq_len, dev_name),
            "data_wait_s": wait, "data_wait_fraction": wait / (step_time * args.steps),
            "data_wait_warmup_s": start["data_wait_s"],  # includes the wait for the very first batch
            "checkpoint_blocking_s": end.get("checkpoint_blocking_s"),
            "last_loss": end["loss"], "wall_s": wall_s, "rows": rows}


def run_loop(cfg: Config, train_blocks, val_blocks, manifest, args, device, dev_name: str) -> dict:
    from raylm.train import train_local

    cfg = dataclasses.replace(cfg, name="loop")
    t0 = time.perf_counter()
    train_local(cfg, train_blocks, val_blocks, resume="never", device=str(device), manifest=manifest,
                log=lambda msg: print(f"loop: {msg}", file=sys.stderr))
    out = timed_window(cfg, args, metrics_rows(cfg.run_dir), dev_name, time.perf_counter() - t0)
    # Its final checkpoint (13 GB at the 1b shape with optimizer state) must not crowd the disk
    # the Ray run writes its own to.
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return out


def run_ray(cfg: Config, data_dir: str, manifest: dict, args, dev_name: str) -> dict:
    import ray

    import raylm.data
    from raylm.pipeline import init_ray
    from raylm.train_ray import run_ray_training

    started = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    init_ray(cfg)
    # training_dataset hands splits under IN_MEMORY_BYTES to Ray from the driver's memory;
    # at 0 every split streams from its parquet shards, as a real corpus does.
    saved = raylm.data.IN_MEMORY_BYTES
    if args.source == "parquet":
        raylm.data.IN_MEMORY_BYTES = 0
    try:
        t0 = time.perf_counter()
        result = run_ray_training(cfg, raylm.data.prepared_datasets(data_dir, manifest, cfg.s3), manifest,
                                  resume="never")
        wall_s = time.perf_counter() - t0
    finally:
        raylm.data.IN_MEMORY_BYTES = saved
        if started:  # a cluster this run started ends with it (its workers' output flushed first)
            ray.shutdown()
    if result.error:
        raise result.error
    out = timed_window(cfg, args, metrics_rows(cfg.run_dir), dev_name, wall_s)
    out["ray"] = ray.__version__
    return out


# --------------------------------------------------------------------------- main


def same_training(bare: dict, other: dict, precision: str) -> dict:
    """Same weights, data, order and schedule: the last step's loss must agree (to round-off
    in fp32; bf16 kernels on GPUs are not bitwise deterministic across processes)."""
    tol = 1e-4 if precision == "fp32" else 2e-2
    rel = abs(other["last_loss"] - bare["last_loss"]) / abs(bare["last_loss"])
    return {"last_loss_rel_diff": rel, "tolerance": tol, "ok": rel <= tol}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="raylm-ray-overhead-")
    os.makedirs(work_dir, exist_ok=True)
    cfg = run_config(args, os.path.abspath(work_dir))
    precision = resolve_precision(cfg.train.precision, device)
    dev_name = device_name(device)
    tc = cfg.train
    report = {
        "benchmark": "ray_overhead",
        "device": dev_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {**vars(args), "precision": precision, "max_steps": tc.max_steps,
                     "tokens_per_step": tc.global_batch_size * cfg.data.seq_len,
                     "grad_accum": tc.global_batch_size // tc.micro_batch_size},
        "model": dataclasses.asdict(cfg.model),
        "params": count_params(cfg.model),
        "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
        "peak_flops": peak_flops(dev_name),
        "goal_ratio": GOAL_RATIO.get(device.type),
    }
    # One more global batch than the run consumes: the epoch never ends inside the run.
    train_blocks = random_blocks(cfg, (tc.max_steps + 1) * tc.global_batch_size, args.seed + 1)
    val_blocks = random_blocks(cfg, val_set_rows(tc), args.seed + 2)
    data_dir = os.path.join(os.path.abspath(work_dir), "data")
    manifest = write_prepared_dataset(data_dir, cfg, train_blocks, val_blocks)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))  # what a Ray Train worker gets
    try:
        init_local_process_group(device)
        try:
            print(f"bare: {args.preset}, {precision}, compile={tc.compile}, loss_chunk={tc.loss_chunk_size}",
                  file=sys.stderr)
            report["bare"] = run_bare(cfg, train_blocks, args, device, dev_name)
            free_memory(device)
            if not args.skip_loop:
                print("loop: raylm.train.train_local (fit without Ray)", file=sys.stderr)
                report["loop"] = run_loop(cfg, train_blocks, val_blocks, manifest, args, device, dev_name)
                free_memory(device)
        finally:
            dist.destroy_process_group()
        print(f"ray: Ray Train, 1 worker, Ray Data from {args.source}", file=sys.stderr)
        report["ray"] = run_ray(cfg, data_dir, manifest, args, dev_name)
        if args.bare_after:
            # The bare step again, once Ray is gone: a machine whose speed drifts between the
            # two measurements would otherwise decide the ratio (seen: the bare step at 10.6k
            # and 12.3k tokens/s in back-to-back runs, the Ray step at 10.3-10.9k in both).
            print("bare, again after the Ray run", file=sys.stderr)
            init_local_process_group(device)
            try:
                report["bare_after"] = run_bare(cfg, train_blocks, args, device, dev_name)
                free_memory(device)
            finally:
                dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    bare = report["bare"]
    bare_rate = bare["tokens_per_s"]
    if "bare_after" in report:  # the ratio against the bare step's mean over both sides of the Ray run
        report["ratio_ray_to_bare_before"] = report["ray"]["tokens_per_s"] / bare_rate
        report["ratio_ray_to_bare_after"] = report["ray"]["tokens_per_s"] / report["bare_after"]["tokens_per_s"]
        bare_rate = (bare_rate + report["bare_after"]["tokens_per_s"]) / 2
    report["ratio_ray_to_bare"] = report["ray"]["tokens_per_s"] / bare_rate
    report["same_training"] = {"ray": same_training(bare, report["ray"], precision)}
    if "loop" in report:
        report["ratio_loop_to_bare"] = report["loop"]["tokens_per_s"] / bare["tokens_per_s"]
        report["same_training"]["loop"] = same_training(bare, report["loop"], precision)
    for name, check in report["same_training"].items():
        if not check["ok"]:
            print(f"WARNING: the {name} run's last loss differs from the bare run's by "
                  f"{check['last_loss_rel_diff']:.2e} (> {check['tolerance']}): they did not train the same thing",
                  file=sys.stderr)
    return report


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
