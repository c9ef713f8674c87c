"""Rank 0 rewrites the run's record.json with the training hardware once its Train run starts
(raylm.train_ray.record_training_hardware). That rewrite did not check the driver's hold on the
run, as every other write of a worker does: a SIGKILLed driver's worker, still running for a
second or two, could write its read of record.json back over the one a restarted driver had
just written. Real processes hold the lock."""

import json
import os

import pytest
import torch

from raylm import run_lock
from raylm.config import load_config
from raylm.run_lock import RunTaken
from raylm.train_ray import record_training_hardware
from tests.unit.test_fencing_lock_tokens import TAKEN, _holder, _stop


def test_a_worker_whose_driver_lost_the_run_leaves_the_record_alone(tmp_path):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=run"])
    run = cfg.run_dir
    os.makedirs(run)
    record = os.path.join(run, "record.json")
    with open(record, "w") as f:
        json.dump({"hardware": {"driver": "old"}}, f)
    with run_lock.held(run):
        mine = run_lock.fence_for(run)
        record_training_hardware(cfg, torch.device("cpu"), 0, 1, mine)  # while held: written
    assert "training" in json.load(open(record))["hardware"]
    proc, _ = _holder(run)  # the restarted driver holds the run and writes its own record
    try:
        with open(record, "w") as f:
            json.dump({"hardware": {"driver": "new"}}, f)
        with pytest.raises(RunTaken, match=TAKEN):
            record_training_hardware(cfg, torch.device("cpu"), 0, 1, mine)
    finally:
        _stop(proc)
    assert json.load(open(record)) == {"hardware": {"driver": "new"}}
