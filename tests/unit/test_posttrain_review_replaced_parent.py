"""A resumed post-training run whose parent checkpoint was replaced at the same path (the
parent run started over under its name and wrote its step again, other weights): the run's
record holds the sha256 of the commit marker it started from, but the resume never compared
it. A resumed DPO run silently took the new checkpoint as its frozen reference (the implicit
reward no longer starts from the policy it trained against), and an SFT run rewrote its
record with the new checkpoint's hash, naming a parent it never came from."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from raylm import checkpoint
from raylm.config import load_config
from raylm.errors import UserError
from raylm.posttrain import parent_of, recorded_parent


def _marker_sha(ckpt) -> str:
    return hashlib.sha256((ckpt / checkpoint.COMMIT_MARKER).read_bytes()).hexdigest()


def _started_run(tiny_run, tmp_path, stage: str):
    """A copy of the parent, and a `stage` run of it with a checkpoint of its own and a record
    naming the parent's checkpoint and its hash, as `raylm sft`/`dpo` leaves them."""
    parent = shutil.copytree(tiny_run, tmp_path / "parent")
    first = parent / "ckpt-00000200"
    run = tmp_path / "runs" / stage
    shutil.copytree(first, run / "ckpt-00000010")
    shutil.copytree(parent / "tokenizer", run / "tokenizer")
    (run / "record.json").write_text(json.dumps({"stage": stage, "parent": {
        "checkpoint": str(first), "sha256": _marker_sha(first), "stage": "pretrain"}}))
    cfg = load_config(overrides=[f"stage={stage}", f"init_from={parent}", "data.seq_len=64",
                                 f"storage={tmp_path}/runs", f"name={stage}"])
    return cfg, first


def _replace(ckpt) -> None:
    """Another complete checkpoint at the same path: meta.json rewritten (other bytes, as a
    new training's would be) and the commit marker listing it."""
    meta = json.loads((ckpt / checkpoint.META).read_text())
    meta["train_seconds"] = float(meta.get("train_seconds", 0.0)) + 1.0
    data = json.dumps(meta).encode()
    (ckpt / checkpoint.META).write_bytes(data)
    marker = json.loads((ckpt / checkpoint.COMMIT_MARKER).read_text())
    marker["files"][checkpoint.META] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / checkpoint.COMMIT_MARKER).write_text(json.dumps(marker, indent=0))


def test_a_resumed_dpo_run_refuses_a_replaced_reference(tiny_run, tmp_path):
    cfg, first = _started_run(tiny_run, tmp_path, "dpo")
    sha = _marker_sha(first)
    assert parent_of(cfg, recorded_parent(cfg, "auto"))[1]["sha256"] == sha  # unchanged: resumes
    _replace(first)
    with pytest.raises(UserError, match=r"ckpt-00000200: not the checkpoint .*record\.json names"):
        parent_of(cfg, recorded_parent(cfg, "auto"))


def test_a_resumed_sft_run_keeps_its_parents_facts_when_the_parent_is_replaced(tiny_run, tmp_path):
    cfg, first = _started_run(tiny_run, tmp_path, "sft")
    sha = _marker_sha(first)
    _replace(first)
    resumed, facts = parent_of(cfg, recorded_parent(cfg, "auto"))
    assert facts["checkpoint"] == str(first) and facts["sha256"] == sha  # the parent it came from
    assert resumed.tokenizer.path == str(tmp_path / "runs" / "sft" / "tokenizer")  # the run's own
