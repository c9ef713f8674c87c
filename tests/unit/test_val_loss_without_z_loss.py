"""train.z_loss is a training penalty: val_loss and val_ppl are the next-token loss and its
perplexity without it, the quantity `raylm eval`'s loss and bits per byte measure."""

import json
import math

import numpy as np
import pytest
import torch

import raylm.train as train
from raylm.config import load_config
from raylm.checkpoint import load_model_weights
from raylm.model import build_model
from raylm.objectives import NextTokenObjective

OVERRIDES = ["model.vocab_size=64", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16",
             "data.seq_len=16", "train.micro_batch_size=4", "train.global_batch_size=4", "train.warmup_steps=1",
             "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.eval_batches=1",
             "train.async_checkpoint=false", "train.z_loss=0.05"]


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (n, 17)).astype(np.int32)


def test_val_loss_leaves_the_z_loss_penalty_out(tmp_path, one_thread):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=z", *OVERRIDES])
    val = blocks(4, 1)
    train.train_local(cfg, blocks(8, 0), val, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "z" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["kind"] == "val"]
    model = build_model(cfg.model)
    load_model_weights(model, str(tmp_path / "z" / "ckpt-00000002"))
    batch = [{"tokens": torch.from_numpy(val).long()}]
    ce, _ = train.evaluate(model, NextTokenObjective(), batch)
    with_penalty, _ = train.evaluate(model, NextTokenObjective(z_loss=0.05), batch)
    assert with_penalty - ce > 0.1  # the penalty is large enough to tell apart
    assert row["val_loss"] == pytest.approx(ce, abs=1e-4)
    assert row["val_ppl"] == pytest.approx(math.exp(ce), rel=1e-4)
