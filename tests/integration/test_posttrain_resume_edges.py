"""A post-training run resumed after its parent checkpoint is gone (deleted by hand, or by the
parent run's retention as it trains on): SFT resumes from its own checkpoint with its own
model and tokenizer, and keeps the parent's facts in its record; DPO, whose reference is the
parent's weights, is refused in one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from raylm import synthetic as S
from raylm.config import load_config
from raylm.errors import PathNotFoundError
from raylm.posttrain import parent_of, posttrain, recorded_parent

pytestmark = pytest.mark.integration

SETTINGS = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.log_every=1", "train.eval_batches=1",
            "train.num_workers=1", "train.cpus_per_worker=1", "data.val_fraction=0.1", "train.async_checkpoint=false",
            "train.warmup_steps=1", "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=4", "train.lr=3e-3"]


def _copy_run(tiny_run, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_run, parent)
    return parent


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "train"]


def test_sft_resumes_after_its_parent_checkpoint_is_gone(ray_local, tiny_run, tmp_path, monkeypatch):
    parent = _copy_run(tiny_run, tmp_path)
    paths = S.write_jsonl(str(tmp_path / "records"), "reverse", 60, 10, seed=0, length=3)
    cfg = load_config(overrides=[f"storage={tmp_path}/runs", "name=sft", "stage=sft", f"init_from={parent}",
                                 f"data.path={paths['train.messages']}", *SETTINGS])
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=3,rank=0,kind=raise")
    with pytest.raises(Exception, match="injected failure"):
        posttrain(cfg)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    record = json.loads((tmp_path / "runs" / "sft" / "record.json").read_text())
    assert record["parent"]["checkpoint"] == str(parent / "ckpt-00000200")
    shutil.rmtree(parent / "ckpt-00000200")  # the parent's retention, or a hand, removed it
    summary = posttrain(cfg)
    assert summary["steps"] == 4
    assert [r["step"] for r in _metrics(cfg.run_dir)] == [1, 2, 3, 4]
    again = json.loads((tmp_path / "runs" / "sft" / "record.json").read_text())
    assert again["parent"]["checkpoint"] == record["parent"]["checkpoint"]
    assert again["parent"]["sha256"] == record["parent"]["sha256"] and len(again["parent"]["sha256"]) == 64
    assert again["parent"]["tokenizer_sha256"] == record["parent"]["tokenizer_sha256"]


def test_dpo_resume_without_its_reference_is_one_line(tiny_run, tmp_path):
    parent = _copy_run(tiny_run, tmp_path)
    first = str(parent / "ckpt-00000200")
    run = tmp_path / "runs" / "dpo"
    shutil.copytree(first, run / "ckpt-00000010")  # a checkpoint of the run's own to resume from
    (run / "record.json").write_text(json.dumps({"stage": "dpo", "parent": {"checkpoint": first}}))
    shutil.rmtree(first)
    cfg = load_config(overrides=["stage=dpo", f"init_from={parent}", "data.seq_len=64", f"storage={tmp_path}/runs",
                                 "name=dpo"])
    with pytest.raises(PathNotFoundError, match=rf"^{first}: no complete checkpoint there; it is the parent "
                                                rf".*record\.json names and DPO's reference"):
        parent_of(cfg, recorded_parent(cfg, "auto"))


def test_a_run_of_another_stage_is_not_resumed_as_this_one(tiny_run, tmp_path):
    """`raylm dpo --from RUN-sft name=RUN-sft` (or `sft ... name=` of the parent) names a run
    directory of another stage: refused as that, not taken for a resume with the advice to
    pass the other run's parent (which would then train the SFT run's checkpoints on DPO)."""
    from raylm.config import ConfigError

    parent = _copy_run(tiny_run, tmp_path)
    first = str(parent / "ckpt-00000200")
    run = tmp_path / "runs" / "sft"
    shutil.copytree(first, run / "ckpt-00000010")
    (run / "record.json").write_text(json.dumps({"stage": "sft", "parent": {"checkpoint": first}}))
    for init_from in (run, parent):
        cfg = load_config(overrides=["stage=dpo", f"init_from={init_from}", f"storage={tmp_path}/runs", "name=sft"])
        with pytest.raises(ConfigError, match=rf"^{run}: a stage=sft run, not dpo; give the dpo run its own "):
            recorded_parent(cfg, "auto")
    (parent / "record.json").write_text(json.dumps({"stage": "pretrain"}))
    cfg = load_config(overrides=["stage=sft", f"init_from={parent}", f"storage={tmp_path}", "name=parent"])
    with pytest.raises(ConfigError, match=rf"^{parent}: a stage=pretrain run, not sft"):
        recorded_parent(cfg, "auto")
    assert recorded_parent(load_config(overrides=["stage=sft", f"init_from={parent}", f"storage={tmp_path}/runs",
                                                  "name=sft"]), "auto") == first
