"""A resume that the run's checkpoints refuse leaves the run's record.json as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.pipeline import pretrain
from tests.small import SMALL

pytestmark = pytest.mark.integration

RUN = [*SMALL, "train.num_workers=1", "train.eval_every=2", "train.ckpt_every=2", "train.timeout_s=600"]


def test_a_refused_resume_keeps_the_record_of_the_checkpoints(ray_local, tmp_path):
    """`raylm pretrain name=R seed=7` on a run R trained with seed 1337 is refused, and
    R/record.json still describes R's checkpoints (seed 1337), so `--from-record` reruns R:
    before, the record was replaced first and the refusal came from the worker."""
    base = [f"storage={tmp_path}", "name=r", "train.max_steps=2", *RUN]
    cfg = load_config(overrides=base)
    pretrain(cfg, samples=False)
    record = Path(cfg.run_dir, "record.json")
    before = record.read_bytes()
    with pytest.raises(Exception) as refused:
        pretrain(load_config(overrides=[*base, "seed=7", "train.max_steps=4"]), samples=False)
    from raylm.cli import _root_cause

    assert "seed=1337, now 7" in str(_root_cause(refused.value))
    assert record.read_bytes() == before
