"""The training loop without Ray (`train_local`): checkpoints and a bit-exact resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from raylm.config import load_config
from raylm.train import train_local

OVERRIDES = ["model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16",
             "data.seq_len=16", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=2",
             "train.log_every=1", "train.eval_every=100", "train.ckpt_every=3", "train.eval_batches=1"]


def blocks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.arange(17)[None, :] * rng.integers(1, 4, (n, 1)) % 64).astype(np.int32)


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["consumed_blocks"]) for r in rows if r["kind"] == "train"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    train, val = blocks(40, 0), blocks(8, 1)
    cfg = {name: load_config(overrides=[f"storage={tmp_path}", f"name={name}", "train.max_steps=8", *OVERRIDES])
           for name in ("whole", "part")}
    train_local(cfg["whole"], train, val, log=lambda *_: None)
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=5,rank=0,kind=raise")
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        train_local(cfg["part"], train, val, log=lambda *_: None)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    train_local(cfg["part"], train, val, resume="must", log=lambda *_: None)  # from ckpt-3
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # ==, not isclose
    assert [s for s, _, _ in losses(tmp_path / "part")] == list(range(1, 9))
