"""Spawned processes for tests of code that runs on every rank (gloo on CPU)."""

from __future__ import annotations

from typing import Callable

import torch


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
