"""How long a checkpoint stalls training: synchronous against asynchronous saves of one state.

    python benchmarks/checkpoint_blocking.py                          # gpt2-124m shape, CPU
    python benchmarks/checkpoint_blocking.py --preset tiny --saves 2  # smoke test
    python benchmarks/checkpoint_blocking.py --storage s3://bucket/bench --out benchmarks/results/cpu-ckpt.json

Both modes save the same model and AdamW state through raylm's `CheckpointSaver` (DCP shards,
upload to --storage, commit marker), with real training steps between saves, in one process
without Ray. "Blocking" is the time the training loop spends inside the saver: for sync, the
whole write, upload and commit; for async, the copy of the state to host memory (plus any
wait for the previous save, which the steps between saves are meant to cover). The end-to-end
time of the loop is reported too: on a CPU the background writer competes with training for
cores, so async hides less there than on a GPU, where the copy is the only work it takes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import run_and_emit  # noqa: E402


def model_overrides(args) -> list[str]:
    from raylm.config import MODEL_PRESETS

    vocab = MODEL_PRESETS[args.preset].vocab_size or 2048  # presets sized by their tokenizer get the default one
    return [f"model.preset={args.preset}", f"model.vocab_size={vocab}"]


def measure(mode: bool, args, storage: str) -> dict:
    import torch

    from raylm.config import load_config
    from raylm.train import CheckpointSaver, Hooks, NextTokenObjective, make_optimizer, setup_model, storage_publisher
    from raylm.train import train_step

    cfg = load_config(overrides=[*model_overrides(args), f"storage={storage}",
                                 f"name={'async' if mode else 'sync'}", f"train.async_checkpoint={str(mode).lower()}",
                                 f"data.seq_len={args.seq_len}", "train.keep_checkpoints=1", "train.precision=fp32"])
    device = torch.device("cpu")
    model, _, _ = setup_model(cfg, device, "never", log=lambda *_: None)
    optimizer = make_optimizer(model, cfg.train, device)
    hooks = Hooks(report=lambda m: None, publish_checkpoint=storage_publisher(cfg), val_batches=lambda: [],
                  checkpoint_meta={})
    saver = CheckpointSaver(cfg, hooks, log=lambda m: print(m, file=sys.stderr))
    objective = NextTokenObjective()
    gen = torch.Generator().manual_seed(0)

    def step():
        batch = {"tokens": torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)}
        train_step(model, optimizer, [batch], objective, 1e-4, 1.0)

    step()  # optimizer state exists before the first save, as in a real run
    per_save, t0 = [], time.perf_counter()
    for i in range(args.saves):
        before = saver.blocking_s
        saver.save(model, optimizer, i + 1, 0, {})
        per_save.append(saver.blocking_s - before)
        for _ in range(args.steps_between):
            step()
    # The last save's wait, timed here: `finish` called on its own adds nothing to
    # saver.blocking_s (only `save` counts, its wait for the previous save included).
    t1 = time.perf_counter()
    saver.finish()
    final_wait = time.perf_counter() - t1
    return {"blocking_s_per_save": [round(x, 3) for x in per_save],
            "mean_blocking_s": round(sum(per_save) / len(per_save), 3),
            "final_wait_s": round(final_wait, 3), "loop_wall_s": round(time.perf_counter() - t0, 2)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--steps-between", type=int, default=3, help="training steps between saves")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--storage", help="where checkpoints go (default: a temporary local directory, "
                                            "removed at the end)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.saves < 1:  # the mean blocking time divides by it
        parser.error(f"--saves {args.saves}: must be at least 1")
    storage = args.storage or tempfile.mkdtemp(prefix="raylm-ckptbench-")

    from raylm.config import load_config
    from raylm.model import count_params

    params = count_params(load_config(overrides=model_overrides(args)).model)
    try:
        sync = measure(False, args, storage)
        async_ = measure(True, args, storage)
    finally:
        if not args.storage:  # the default directory holds two full checkpoints (3 GB at gpt2-124m)
            shutil.rmtree(storage, ignore_errors=True)
    return {
        "benchmark": "checkpoint_blocking", "preset": args.preset, "params": params,
        "state_mb": round(params * 4 * 3 / 1e6),  # fp32 weights + AdamW's two moments
        "storage": "s3" if storage.startswith("s3://") else "local", "cpu_count": os.cpu_count(),
        "sync": sync, "async": async_,
        "blocking_ratio_async_vs_sync": round(async_["mean_blocking_s"] / max(sync["mean_blocking_s"], 1e-9), 3),
        "settings": {"out": args.out, "saves": args.saves, "steps_between": args.steps_between,
                     "micro_batch": args.micro_batch, "seq_len": args.seq_len},
    }


if __name__ == "__main__":
    run_and_emit(main)
