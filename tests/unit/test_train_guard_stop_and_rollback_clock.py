"""Interactions of the training loop's guards with async checkpoints, failure injection and
the time budget (raylm.train.fit):

- a guard's stop (train.on_spike=stop, train.max_nonfinite_steps, train.max_rollbacks) with
  a checkpoint still uploading commits it, as a synchronous save would have been; the async
  run used to lose it, and its resume went back to the checkpoint before;
- RAYLM_INJECT_FAILURE's nan and spike kinds poison DPO steps too (a KeyError before: the
  poisoned objective had no token count, and the fallback read a `tokens` column);
- a run resumed right after a spike rollback has the time budget the uninterrupted run had
  left: the rollback's marker records the training seconds spent, which the checkpoint it
  rolled back to predates."""

from __future__ import annotations

import json

import pytest
import torch

import raylm.train as T
from raylm import checkpoint
from raylm.config import ModelConfig, load_config
from raylm.errors import TrainingStopped
from raylm.model import build_model
from raylm.objectives import DPOObjective, SFTObjective
from raylm.train import PoisonedObjective, train_local, train_step
from tests.unit.test_train_local import OVERRIDES, blocks

COMMON = [o for o in OVERRIDES if not o.startswith("train.ckpt_every")] + ["train.ckpt_every=4", "train.max_steps=8"]


@pytest.mark.parametrize("kind,settings,stop", [
    ("spike", ["train.on_spike=stop"], "loss spike .* train.on_spike=stop"),
    ("nan", ["train.max_nonfinite_steps=0"], "1 non-finite steps in a row"),
    ("spike", ["train.on_spike=rollback", "train.max_rollbacks=0"], "train.max_rollbacks=0"),
], ids=["on-spike-stop", "non-finite", "rollbacks-exhausted"])
def test_a_guard_stop_commits_the_async_checkpoint_in_flight(tmp_path, monkeypatch, kind, settings, stop):
    # ckpt-4 is saved in the background at step 4; step 5 trips the guard before any later
    # step could commit it.
    monkeypatch.setattr(T, "_injection", lambda at, rank: kind if at == 5 else None)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=stopped", "train.spike_window=4",
                                 "train.async_checkpoint=true", *settings, *COMMON])
    with pytest.raises(TrainingStopped, match=stop):
        train_local(cfg, blocks(80, 0), blocks(8, 1), log=lambda *_: None)
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(cfg.run_dir)] == [(4, True)]
    # ... and a resume with the guard's setting changed goes on from it.
    monkeypatch.setattr(T, "_injection", lambda at, rank: None)
    said = []
    last = train_local(load_config(overrides=[f"storage={tmp_path}", "name=stopped", *COMMON]),
                       blocks(80, 0), blocks(8, 1), resume="must", log=said.append)
    assert any("resumed from" in s and "ckpt-00000004" in s for s in said), said
    assert last["step"] == 8


CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_multiple_of=16)


def _pairs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (4, 17), generator=g)
    mask = torch.ones(4, 17, dtype=torch.bool)
    mask[:, :5] = False
    return {"chosen": tokens, "rejected": tokens.flip(0), "chosen_mask": mask, "rejected_mask": mask.clone(),
            "ref_chosen_logp": torch.full((4,), -60.0), "ref_rejected_logp": torch.full((4,), -60.0)}


@pytest.mark.parametrize("factor", [float("nan"), 100.0], ids=["nan", "spike"])
def test_injected_failures_poison_dpo_and_sft_steps(factor):
    model = build_model(CFG, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _pairs()
    plain = train_step(model, opt, [batch], DPOObjective(pad_id=0), 0.0, 1.0)
    poisoned = train_step(model, opt, [batch], PoisonedObjective(DPOObjective(pad_id=0), factor), 0.0, 1.0)
    assert poisoned.skipped == (factor != factor)  # NaN: the step is skipped
    assert (poisoned.count, poisoned.tokens) == (plain.count, plain.tokens) == (4, 2 * 4 * 16)
    tokens = batch["chosen"].clone()
    tokens[:, -4:] = 0  # padding (pad_id 0) is no work done
    sft = {"tokens": tokens, "loss_mask": batch["chosen_mask"]}
    plain = train_step(model, opt, [sft], SFTObjective(pad_id=0), 0.0, 1.0)
    poisoned = train_step(model, opt, [sft], PoisonedObjective(SFTObjective(pad_id=0), factor), 0.0, 1.0)
    assert poisoned.tokens == plain.tokens == 4 * 13


def _final_step(run_dir) -> int:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"][-1]["step"]


def test_a_resume_right_after_a_rollback_keeps_the_budget_the_run_had_left(tmp_path, monkeypatch):
    """Each step spends 1/8 s of a 1.5 s budget (exact in binary, so resumed and uninterrupted
    clocks agree to the bit). Step 6 spikes and rolls back to ckpt-4 with 0.75 s spent: the
    uninterrupted run has 6 steps left (5 to 10). Resumed from ckpt-4 (0.5 s) after a crash
    at the redone step 5, it must have the same 6, not 8."""
    from raylm.train import TrainClock

    def tick(self):
        self.spent += 0.125
        return self.spent

    monkeypatch.setattr(TrainClock, "tick", tick)
    monkeypatch.setattr(T, "_injection", lambda at, rank: "spike" if at == 6 else None)
    common = [f"storage={tmp_path}", "train.max_steps=1000", "train.time_budget_s=1.5", "train.spike_window=4",
              "train.on_spike=rollback", "train.async_checkpoint=false", *COMMON[:-1]]
    train, val = blocks(160, 0), blocks(8, 1)
    train_local(load_config(overrides=["name=whole", *common]), train, val, log=lambda *_: None)
    assert _final_step(tmp_path / "whole") == 10
    part = load_config(overrides=["name=part", *common])
    seen = []

    def crash(cfg, at, rank):  # the second time through step 5: after the rollback
        seen.append(at)
        if seen.count(5) == 2:
            raise RuntimeError("crash after the rollback")

    with monkeypatch.context() as m:
        m.setattr(T, "maybe_inject_failure", crash)
        with pytest.raises(RuntimeError, match="crash after the rollback"):
            train_local(part, train, val, log=lambda *_: None)
    said = []
    train_local(part, train, val, resume="must", log=said.append)
    assert any("resumed from" in s and "ckpt-00000004" in s for s in said), said
    assert _final_step(tmp_path / "part") == 10
    meta = checkpoint.read_meta(checkpoint.latest_complete(str(tmp_path / "part")))
    assert meta["step"] == 10 and meta["train_seconds"] == 1.5


def test_a_rollback_marker_with_a_damaged_train_seconds_is_one_line_naming_it(tmp_path):
    from raylm.errors import CheckpointError
    from raylm.train import ROLLBACK

    base = [f"storage={tmp_path}", "name=r", "train.async_checkpoint=false", *OVERRIDES]
    train, val = blocks(40, 0), blocks(8, 1)
    train_local(load_config(overrides=[*base, "train.max_steps=3"]), train, val, log=lambda *_: None)
    marker = tmp_path / "r" / ROLLBACK
    marker.write_text(json.dumps({"checkpoint": "ckpt-00000003", "consumed_blocks": 24, "guards": {},
                                  "train_seconds": "1.5"}))
    with pytest.raises(CheckpointError, match=f"^{marker}: damaged .*train_seconds") as e:
        train_local(load_config(overrides=[*base, "train.max_steps=4"]), train, val, resume="must",
                    log=lambda *_: None)
    assert "\n" not in str(e.value)
