"""A run resumes after retention deleted its older checkpoints: a real Ray Train run on local
storage, one worker, the small model of tests/small.py.

Ray Train keeps its own list of the checkpoints reported to it in the run directory
(`checkpoint_manager_snapshot.json`) and refuses to start a run whose list names a directory
that is gone. raylm's retention (train.keep_checkpoints) deletes old checkpoints, so every
resume after a deletion (`pretrain --resume`, a resubmitted driver, a Tune trial restored)
failed in Ray's controller with CheckpointManagerInitializationError, before a step. (On
SeaweedFS it did not: its filer keeps a deleted prefix as an empty directory, which Ray takes
for the checkpoint; AWS S3 keeps nothing, as a local disk.)
"""

from __future__ import annotations

import re

import pytest

from raylm import checkpoint
from tests.integration.test_recovery import config, train, train_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """tests.small's corpus, tokenizer and prepared blocks, on local storage."""
    from tests.small import prepare_small

    return prepare_small(str(tmp_path_factory.mktemp("checkpoint-recovery")))


def test_a_resume_after_retention_deleted_checkpoints_starts(prepared, capfd):
    one = ("train.num_workers=1", "train.ckpt_every=1", "train.keep_checkpoints=1")
    cfg = config(prepared, "kept-one", "train.max_steps=3", *one)
    assert train(prepared, cfg) is None
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(cfg.run_dir, cfg.s3)] == [(3, True)]
    capfd.readouterr()

    more = config(prepared, "kept-one", "train.max_steps=4", *one)
    error = train(prepared, more, resume="must")
    assert error is None, f"{type(error).__name__}: {str(error)[:300]}"
    out = capfd.readouterr().out
    assert re.search(r"resumed from \S+/kept-one/ckpt-00000003 \(step 3, 24 blocks consumed", out), out[-3000:]
    assert [r["step"] for r in train_rows(more)] == [1, 2, 3, 4]
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(cfg.run_dir, cfg.s3)] == [(4, True)]
