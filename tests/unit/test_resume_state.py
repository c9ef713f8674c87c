"""A resumed run carries on with the loop's guards as the uninterrupted run had them: the
spike detector's history, the non-finite streak, and the skip, spike and rollback counts (the
metrics' columns, train.max_rollbacks). Without them it was blind to spikes for half a window
after a resume, and its counters started again from zero."""

import json

import pytest
import torch

import raylm.train as T
from raylm.config import load_config
from raylm.errors import TrainingStopped
from raylm.train import train_local
from tests.unit.test_train_local import OVERRIDES, blocks

# What the two runs must agree on, row by row (timings aside).
KEYS = ("kind", "step", "loss", "consumed_blocks", "skipped_steps", "loss_spikes", "rollbacks", "spike_step",
        "val_loss")


def rows(run_dir) -> list[dict]:
    return [{k: r[k] for k in KEYS if k in r} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def crash(monkeypatch, step: int, nth: int):
    """The run dies right after it reaches `step` for the `nth` time (after that step's save)."""
    seen = []

    def fail(cfg, at, rank):
        seen.append(at)
        if at == step and seen.count(at) == nth:
            raise RuntimeError(f"crash at step {at}")

    monkeypatch.setattr(T, "maybe_inject_failure", fail)


@pytest.mark.parametrize("step,nth", [(5, 1), (6, 2)], ids=["before-the-spike", "after-its-rollback"])
def test_a_resumed_run_flags_counts_and_rolls_back_as_the_uninterrupted_one(tmp_path, monkeypatch, step, nth):
    # Step 2 is not finite (skipped, on every run through it); step 7 spikes, once, and rolls
    # back to ckpt-4. Resumed from ckpt-4 before the spike, the run must still see it (a fresh
    # history of 2 losses flagged nothing); resumed after the rollback, it has counted it.
    monkeypatch.setattr(T, "_injection", lambda at, rank: {2: "nan", 7: "spike"}.get(at))
    common = [f"storage={tmp_path}", "train.max_steps=10", "train.spike_window=8", "train.ckpt_every=4",
              "train.on_spike=rollback", "train.async_checkpoint=false",
              *[o for o in OVERRIDES if not o.startswith("train.ckpt_every")]]
    train, val = blocks(80, 0), blocks(8, 1)
    train_local(load_config(overrides=["name=whole", *common]), train, val, log=lambda *_: None)
    part = load_config(overrides=["name=part", *common])
    with monkeypatch.context() as m:
        crash(m, step, nth)
        with pytest.raises(RuntimeError, match=f"crash at step {step}"):
            train_local(part, train, val, log=lambda *_: None)
    said = []
    train_local(part, train, val, resume="must", log=said.append)
    assert any("resumed from" in s and "ckpt-00000004" in s for s in said), said
    want = rows(tmp_path / "whole")
    assert [r for r in want if r["kind"] == "rollback"] == [{"kind": "rollback", "step": 4, "spike_step": 7}]
    assert want[-1] == {**want[-1], "step": 10, "skipped_steps": 1, "loss_spikes": 1, "rollbacks": 1}
    assert rows(tmp_path / "part") == want


def test_a_non_finite_streak_goes_on_across_a_resume(tmp_path, monkeypatch):
    """Steps 4 to 6 are not finite; train.max_nonfinite_steps=2 stops the run at step 6, also
    when it resumed from ckpt-4 (whose streak was 1) after a crash at step 5."""
    monkeypatch.setattr(T, "_injection", lambda at, rank: "nan" if 4 <= at <= 6 else None)
    common = [f"storage={tmp_path}", "train.max_steps=8", "train.max_nonfinite_steps=2", "train.ckpt_every=4",
              "train.async_checkpoint=false", *[o for o in OVERRIDES if not o.startswith("train.ckpt_every")]]
    train, val = blocks(40, 0), blocks(8, 1)
    stop = "step 6: 3 non-finite steps in a row"
    with pytest.raises(TrainingStopped, match=stop):
        train_local(load_config(overrides=["name=whole", *common]), train, val, log=lambda *_: None)
    part = load_config(overrides=["name=part", *common])
    with monkeypatch.context() as m:
        crash(m, 5, 1)
        with pytest.raises(RuntimeError, match="crash at step 5"):
            train_local(part, train, val, log=lambda *_: None)
    with pytest.raises(TrainingStopped, match=stop):
        train_local(part, train, val, resume="must", log=lambda *_: None)


def test_a_checkpoint_without_guards_resumes_with_fresh_ones(tmp_path):
    """Checkpoints from before the guards were recorded still load: the guards start afresh."""
    from raylm import checkpoint

    cfg = load_config(overrides=[f"storage={tmp_path}", "name=old", "train.max_steps=3", *OVERRIDES])
    train_local(cfg, blocks(40, 0), blocks(8, 1), log=lambda *_: None)
    meta_path = tmp_path / "old" / "ckpt-00000003" / checkpoint.META
    meta = json.loads(meta_path.read_text())
    del meta["guards"]
    meta_path.write_text(json.dumps(meta))
    marker = tmp_path / "old" / "ckpt-00000003" / checkpoint.COMMIT_MARKER
    files = json.loads(marker.read_text())["files"]
    files[checkpoint.META] = checkpoint.file_digests(str(meta_path.parent))[checkpoint.META]
    marker.write_text(json.dumps({"step": 3, "files": files}))
    _, _, start = T.setup_model(cfg.for_device("cpu"), torch.device("cpu"), "must", log=lambda *_: None)
    assert (start.step, start.guards) == (3, {})
    last = train_local(load_config(overrides=[f"storage={tmp_path}", "name=old", "train.max_steps=4", *OVERRIDES]),
                       blocks(40, 0), blocks(8, 1), log=lambda *_: None)
    assert last["step"] == 4 and last["skipped_steps"] == 0 and last["rollbacks"] == 0
