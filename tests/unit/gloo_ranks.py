"""Spawned processes for tests of code that runs on every rank (gloo on CPU)."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist


def run_ranks(target: Callable, args_of: Callable[[int], tuple], n: int = 2, timeout_s: float = 240) -> None:
    """Run `target(*args_of(rank))` in `n` spawned processes; fails unless each exits 0 within
    `timeout_s` (a rank left waiting in a collective its peer skipped is killed then)."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(rank)) for rank in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * n


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store_path: str, timeout_s: float = 60) -> Iterator[None]:
    """In a spawned rank: one torch thread and a gloo group over a file store, destroyed on
    exit. `timeout_s`: a rank left waiting in a collective fails after it, not after torch's
    30 minutes."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
