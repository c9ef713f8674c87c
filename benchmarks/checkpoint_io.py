"""Checkpoint load I/O per rank: ranged reads straight from storage against downloading the
whole checkpoint first (what every rank did before `raylm.checkpoint.RangedReader`).

    python benchmarks/checkpoint_io.py --storage s3://bucket/bench                 # gpt2-124m shape, 2 workers
    python benchmarks/checkpoint_io.py --storage s3://bucket/bench --preset tiny   # smoke test

Two worker processes (gloo, CPU, FSDP2 over both, as Ray Train workers shard a model) train
one step so that AdamW has its state, save a checkpoint the way `CheckpointSaver` does (each
rank writes and uploads its DCP shards, the file digests are gathered, rank 0 commits), then
load it twice into fresh sharded models:
  * download: the whole checkpoint copied to local disk, then loaded (the previous `load`);
  * ranged: `checkpoint.load`, each rank reading only its shards' byte ranges from storage.
Both loads must give the same weights and optimizer state. Rank 0 also times a weights-only
load (`load_model_weights`, one process: eval, export, serving), which must read no byte of
an optimizer entry. Prints one JSON object: bytes read and seconds per rank for each way.
S3 credentials and endpoint come from the environment (AWS_*), as for the rest of raylm.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import run_and_emit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default="", help="where to write the checkpoint (s3://... or a directory; "
                                                 "default: a temporary directory)")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer-vocab", type=int, default=0,
                   help="vocabulary to size the model by (default: the preset's design size)")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh(cfg):
    import torch

    from raylm.config import TrainConfig
    from raylm.parallel import build_parallel_model
    from raylm.train import make_optimizer

    model = build_parallel_model(cfg, torch.device("cpu"), "fp32", seed=0)
    return model, make_optimizer(model, TrainConfig(), torch.device("cpu"))


def _state(model, optimizer) -> dict:
    """This rank's local shards of the model and optimizer state, as plain CPU tensors."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, torch.Tensor):
            flat[prefix] = (x.to_local() if hasattr(x, "to_local") else x).detach().clone()

    walk("model", model_sd)
    walk("optim", optim_sd)
    return flat


def _save(cfg, ckpt: str, s3, rank: int) -> None:
    import torch
    import torch.distributed as dist

    from raylm import checkpoint, storage
    from raylm.train import NextTokenObjective, train_step

    model, optimizer = _fresh(cfg)
    g = torch.Generator().manual_seed(rank)
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (2, 33), generator=g)}
    train_step(model, optimizer, [batch], NextTokenObjective(), lr=1e-3, grad_clip=1.0)  # AdamW state exists
    with tempfile.TemporaryDirectory(prefix="raylm-ckptio-") as local:
        checkpoint.write_local(model, optimizer, {"step": 1}, local)
        storage.upload_dir(local, ckpt, s3)
        files = [None] * dist.get_world_size()
        dist.all_gather_object(files, checkpoint.file_digests(local))
    dist.barrier()
    if rank == 0:
        checkpoint.commit(ckpt, {"step": 1}, s3, {k: v for f in files for k, v in f.items()})
    dist.barrier()


def _download_load(cfg, ckpt: str, s3) -> tuple[dict, dict]:
    """The previous `checkpoint.load`: the whole checkpoint to local disk, then loaded there."""
    from raylm import checkpoint, storage

    model, optimizer = _fresh(cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raylm-ckptio-dl-") as local:
        storage.download_dir(ckpt, local, s3)
        nbytes = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(local) for n in ns)
        checkpoint.load(model, optimizer, local)
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0}, _state(model, optimizer)


def _ranged_load(cfg, ckpt: str, s3) -> tuple[dict, dict]:
    from raylm import checkpoint

    model, optimizer = _fresh(cfg)
    t0 = time.perf_counter()
    checkpoint.load(model, optimizer, ckpt, s3)
    seconds = time.perf_counter() - t0
    reader = checkpoint._last_reader[-1]
    return {"bytes": reader.bytes_read, "seconds": seconds, "requests": reader.requests}, _state(model, optimizer)


def _weights_only(cfg, ckpt: str, s3) -> dict:
    """One process, a plain model: the entries it reads, against where the optimizer's lie."""
    from raylm import checkpoint
    from raylm.model import build_model

    model = build_model(cfg, "cpu", seed=1)
    t0 = time.perf_counter()
    checkpoint.load_model_weights(model, ckpt, s3)
    seconds = time.perf_counter() - t0
    reader = checkpoint._last_reader[-1]
    optim = [(info.relative_path, info.offset, info.offset + info.length)
             for index, info in reader.storage_data.items() if index.fqn.startswith("optim.")]
    overlaps = sum(1 for name, off, n in reader.reads for o_name, lo, hi in optim
                   if name == o_name and off < hi and lo < off + n)
    model_bytes = sum(info.length for index, info in reader.storage_data.items() if index.fqn.startswith("model."))
    return {"bytes": reader.bytes_read, "seconds": seconds, "requests": reader.requests,
            "model_entry_bytes": model_bytes, "optimizer_ranges_read": overlaps}


def worker(rank: int, world: int, port: int, cfg_dict: dict, ckpt: str, out_dir: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from raylm.config import ModelConfig, S3Config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, s3 = ModelConfig(**cfg_dict), S3Config()
        _save(cfg, ckpt, s3, rank)
        download, want = _download_load(cfg, ckpt, s3)
        ranged, got = _ranged_load(cfg, ckpt, s3)
        same = set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
        row = {"rank": rank, "download": download, "ranged": ranged, "same_state": same}
        dist.barrier()
        if rank == 0:
            row["weights_only"] = _weights_only(cfg, ckpt, s3)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    import dataclasses
    import json

    import torch.multiprocessing as mp

    from raylm import storage
    from raylm.config import MODEL_PRESETS, PRESET_TOKENIZER_VOCAB, S3Config

    args = parse_args(argv)
    cfg = MODEL_PRESETS[args.preset].with_vocab(args.tokenizer_vocab or PRESET_TOKENIZER_VOCAB[args.preset])
    with tempfile.TemporaryDirectory(prefix="raylm-ckptio-") as tmp:
        root = args.storage or os.path.join(tmp, "storage")
        ckpt = storage.join(root, f"ckpt-io-{os.getpid()}-{int(time.time())}")
        mp.spawn(worker, args=(args.workers, _free_port(), dataclasses.asdict(cfg), ckpt, tmp), nprocs=args.workers)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.workers)]
        total = sum(f.size for f in storage.list_files(ckpt, S3Config()))
        storage.delete(ckpt, S3Config())
    return {
        "benchmark": "checkpoint_io",
        "settings": {**vars(args), "vocab_size": cfg.vocab_size, "checkpoint": ckpt},
        "checkpoint_bytes": total,
        "ranks": ranks,
        "ranged_over_download_bytes": [r["ranged"]["bytes"] / r["download"]["bytes"] for r in ranks],
        "ranged_over_download_seconds": [r["ranged"]["seconds"] / r["download"]["seconds"] for r in ranks],
    }


if __name__ == "__main__":
    run_and_emit(main)
