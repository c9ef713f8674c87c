"""record.json describes what trained, not only the process that wrote it: the driver's machine
under hardware.driver, and once the Train run has started, rank 0's under hardware.training with
the world size and the number of nodes (on a cluster the driver is often a CPU-only head node or
a laptop). `--from-record` reads the config alone, before and after."""

import json
from pathlib import Path

import torch

import raylm.record as R
from raylm.config import load_config
from raylm.train_ray import record_training_hardware


def test_rank_0_adds_the_workers_hardware_and_keeps_the_drivers(tmp_path, monkeypatch):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=run"])
    uri = R.write_record(cfg, "pretrain")
    before = json.loads(Path(uri).read_text())
    assert before["hardware"] == {"driver": R.hardware(), "training": None}
    recorded = R.load_record(uri)

    # Rank 0 on a GPU node, which the driver is not.
    node = {**R.hardware(), "cpu_count": 96, "gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "gpu_memory_gib": 79.2}
    monkeypatch.setattr(R, "hardware", lambda: node)
    record_training_hardware(cfg, torch.device("cpu"), rank=0, world=1)

    after = json.loads(Path(uri).read_text())
    assert after["hardware"] == {"driver": before["hardware"]["driver"],
                                 "training": {"world_size": 1, "nodes": 1, "device": "cpu", **node}}
    assert {k: v for k, v in after.items() if k != "hardware"} == {k: v for k, v in before.items() if k != "hardware"}
    assert R.load_record(uri) == recorded


def test_world_size_and_nodes_count_ranks_and_distinct_nodes():
    hw = R.training_hardware(["node-a", "node-a", "node-b", "node-b"], "cuda")
    assert (hw["world_size"], hw["nodes"], hw["device"]) == (4, 2, "cuda")
    assert hw["cpu_count"] == R.hardware()["cpu_count"]


def test_a_run_without_a_record_gets_none(tmp_path):
    """A direct caller of run_ray_training writes no record; rank 0 does not start one."""
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=run"])
    record_training_hardware(cfg, torch.device("cpu"), rank=0, world=1)
    assert not Path(cfg.run_dir, R.RECORD).exists()
