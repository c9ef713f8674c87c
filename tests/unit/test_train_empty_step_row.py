"""A step with nothing to learn from (every SFT label of the global batch masked) computes no
loss: its metrics row has loss and grad_norm null and its log line "loss -", where they were
0.0, a perfect loss on the curve, in TensorBoard and in `raylm report`."""

from __future__ import annotations

import json

import numpy as np

from raylm.config import load_config
from raylm.train import train_local
from tests.unit.test_train_empty_step import _tokens


def test_an_empty_steps_row_does_not_claim_a_zero_loss(tmp_path):
    rows = np.asarray(_tokens(4).repeat(6, 1), dtype=np.int32)  # 24 rows of 17 tokens
    mask = np.zeros_like(rows, dtype=bool)
    mask[:, 9:] = True
    mask[8:16] = False  # the second global batch of 8: every label masked
    val = {"tokens": rows[:4], "loss_mask": mask[:4]}
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=sft", "stage=sft", "model.vocab_size=64", "model.dim=32",
                                 "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16",
                                 "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=1",
                                 "train.max_steps=3", "train.log_every=1", "train.eval_every=100",
                                 "train.ckpt_every=100", "train.eval_batches=1", "train.async_checkpoint=false"])
    said: list[str] = []
    train_local(cfg, {"tokens": rows, "loss_mask": mask}, val, log=said.append,
                manifest={"eos_id": 1, "pad_id": 0, "columns": ["tokens", "loss_mask"]})
    train = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    empty = next(r for r in train if r["step"] == 2)
    assert empty["empty_steps"] == 1
    assert empty["loss"] is None and empty["grad_norm"] is None, empty  # was 0.0: no forward pass computed one
    assert not any(s.startswith("step 2/3 | loss 0.0000") for s in said), said
