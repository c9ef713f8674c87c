"""A loss spike with train.on_spike=rollback in a real 2-worker Ray Train run (FSDP2 over gloo,
async checkpoints, the run in S3), which other tests drive only in one process. It held when
written; no defect was found."""

from __future__ import annotations

import pytest

from raylm import checkpoint, storage
from raylm.eval.report import metrics_rows
from tests.integration.test_recovery import BLOCKS_PER_STEP, config, train

pytestmark = pytest.mark.integration


def rows(cfg) -> list[dict]:
    uri = storage.join(cfg.run_dir, "metrics.jsonl")
    return metrics_rows(storage.read_text(uri), uri)


def test_spike_rolls_back_on_every_rank_and_skips_its_batches(prepared, capfd):
    """Rank 1's loss is 100x at step 6; both ranks roll back to the step-4 checkpoint and train
    steps 5-10 again on the blocks after the spike's."""
    cfg = config(prepared, "rollback", "train.on_spike=rollback", "train.spike_window=4",
                 "train.async_checkpoint=true")
    assert train(prepared, cfg, "step=6,rank=1,kind=spike") is None
    out = capfd.readouterr().out
    assert "rolled back to" in out, out
    got = rows(cfg)
    back = [r for r in got if r.get("kind") == "rollback"]
    assert [(r["step"], r["spike_step"]) for r in back] == [(4, 6)]
    trained = [(r["step"], r["consumed_blocks"], r["rollbacks"]) for r in got if r.get("kind") == "train"]
    assert trained == [(s, BLOCKS_PER_STEP * s, 0) for s in range(1, 5)] + \
        [(s, BLOCKS_PER_STEP * (s + 2), 1) for s in range(5, 11)], trained
    assert checkpoint.latest_complete(cfg.run_dir, cfg.s3).endswith(checkpoint.checkpoint_name(10))
    meta = checkpoint.read_meta(checkpoint.latest_complete(cfg.run_dir, cfg.s3), cfg.s3)
    assert (meta["step"], meta["consumed_blocks"], meta["guards"]["rollbacks"]) == (10, 96, 1)

