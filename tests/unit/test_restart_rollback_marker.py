"""A spike rollback's marker (rollback.json) of steps a run trains again does not steer it.

The marker names the checkpoint a spike rolled back to and the data position, guards and
seconds to resume it with. It stayed when the run directory started over (its checkpoints
removed) or resumed from an earlier checkpoint, and once the new run wrote a checkpoint of
that name again, a resume from it took the earlier run's data position (skipping blocks the
new run never saw), its spike counts and its training seconds. Now a run drops a marker of a
checkpoint after the one it starts from. Real tiny runs without Ray (train_local), which
start through the same `setup_model` as a Ray Train worker.
"""

from __future__ import annotations

import os
import shutil

import pytest

from raylm import checkpoint
from raylm.config import load_config
from raylm.train import ROLLBACK, train_local
from tests.unit.test_train_local import OVERRIDES, blocks

TRAIN, VAL = blocks(200, 0), blocks(8, 1)
BLOCKS_PER_STEP = 8  # train.global_batch_size


def settings(tmp_path, *more):
    return load_config(overrides=[f"storage={tmp_path}", "name=run", "train.max_steps=12", "train.spike_window=4",
                                  "train.ckpt_every=4", "train.keep_checkpoints=3", "train.async_checkpoint=false",
                                  *[o for o in OVERRIDES if not o.startswith("train.ckpt_every")], *more])


def rolled_back(tmp_path, monkeypatch) -> str:
    """A run to step 12 whose spike at step 10 rolled it back to ckpt-8 (the marker's)."""
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=10,rank=0,kind=spike")
    train_local(settings(tmp_path, "train.on_spike=rollback"), TRAIN, VAL, log=lambda *_: None)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    run = str(tmp_path / "run")
    assert os.path.exists(os.path.join(run, ROLLBACK))
    return run


def fail_after(tmp_path, monkeypatch, step: int, resume: str = "auto") -> None:
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", f"step={step},rank=0,kind=raise")
    with pytest.raises(RuntimeError, match=f"injected failure at step {step}"):
        train_local(settings(tmp_path), TRAIN, VAL, resume=resume, log=lambda *_: None)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")


def consumed(run: str, step: int) -> int:
    return checkpoint.read_meta(os.path.join(run, checkpoint.checkpoint_name(step)))["consumed_blocks"]


def test_a_run_started_over_is_not_resumed_at_the_earlier_runs_data_position(tmp_path, monkeypatch):
    run = rolled_back(tmp_path, monkeypatch)
    for _, uri, _ in checkpoint.list_checkpoints(run):  # started over in the same directory
        shutil.rmtree(uri)
    fail_after(tmp_path, monkeypatch, 9)  # ckpt-8 written again, by this run
    said = []
    train_local(settings(tmp_path), TRAIN, VAL, resume="must", log=said.append)
    assert f"step 8, {8 * BLOCKS_PER_STEP} blocks consumed" in next(m for m in said if "resumed from" in m)
    assert consumed(run, 12) == 12 * BLOCKS_PER_STEP  # as the uninterrupted run: no block skipped


def test_a_resume_from_before_the_rollback_drops_its_marker(tmp_path, monkeypatch):
    run = rolled_back(tmp_path, monkeypatch)
    for step in (8, 12):  # resumed from ckpt-4, before the rollback's checkpoint
        shutil.rmtree(os.path.join(run, checkpoint.checkpoint_name(step)))
    fail_after(tmp_path, monkeypatch, 9, resume="must")
    train_local(settings(tmp_path), TRAIN, VAL, resume="must", log=lambda *_: None)
    assert consumed(run, 8) == 8 * BLOCKS_PER_STEP and consumed(run, 12) == 12 * BLOCKS_PER_STEP


def test_the_marker_of_the_checkpoint_resumed_from_still_applies(tmp_path, monkeypatch):
    """The rollback's own resume is kept: from ckpt-8, past the blocks that caused the spike."""
    run = rolled_back(tmp_path, monkeypatch)
    assert consumed(run, 12) == (10 + 4) * BLOCKS_PER_STEP  # steps 9 and 10's blocks skipped after the rollback
    shutil.rmtree(os.path.join(run, checkpoint.checkpoint_name(12)))
    said = []
    train_local(settings(tmp_path), TRAIN, VAL, resume="must", log=said.append)
    assert f"step 8, {10 * BLOCKS_PER_STEP} blocks consumed" in next(m for m in said if "resumed from" in m)
    assert consumed(run, 12) == (10 + 4) * BLOCKS_PER_STEP
