"""Checkpoints are written into the run, never through a link planted there. In a shared run
directory anyone who can write there could put a link where a checkpoint's directory or one
of its files will go; Ray Train's own copy (pyarrow) wrote through both, into the directory
or over the file the link names. A real 1-worker Ray Train run, with checkpoints written
synchronously and in the background, and the loop without Ray (`train_local`)."""

from __future__ import annotations

import os

import pytest

from raylm import storage
from raylm.checkpoint import COMMIT_MARKER, checkpoint_name
from raylm.config import load_config
from raylm.pipeline import pretrain
from raylm.train import train_local
from tests.small import SMALL

pytestmark = pytest.mark.integration

SHARD = "__0_0.distcp"


def plant(run_dir: str, tmp_path) -> tuple[str, str]:
    """A link where step 1's checkpoint directory goes, and in step 2's directory (left by an
    attempt that never committed) a link where its first shard goes. Returns what they name."""
    elsewhere, victim = tmp_path / "elsewhere", tmp_path / "victim.txt"
    elsewhere.mkdir()
    victim.write_text("not a checkpoint")
    os.makedirs(run_dir)
    os.symlink(elsewhere, os.path.join(run_dir, checkpoint_name(1)))
    os.makedirs(os.path.join(run_dir, checkpoint_name(2)))
    os.symlink(victim, os.path.join(run_dir, checkpoint_name(2), SHARD))
    return str(elsewhere), str(victim)


def assert_untouched(run_dir: str, elsewhere: str, victim: str) -> None:
    assert os.listdir(elsewhere) == [], "a checkpoint was written into the directory a link named"
    assert open(victim).read() == "not a checkpoint", "a shard was written over the file a link named"
    for step in (1, 2):
        ckpt = os.path.join(run_dir, checkpoint_name(step))
        assert not os.path.islink(ckpt) and os.path.exists(os.path.join(ckpt, COMMIT_MARKER)), ckpt
        assert not os.path.islink(os.path.join(ckpt, SHARD))


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_ray_run_writes_its_checkpoints_in_the_run_not_through_planted_links(prepared, tmp_path, background):
    base, data_dir, _ = prepared
    root = str(tmp_path / "runs")
    elsewhere, victim = plant(storage.join(root, "run"), tmp_path)
    cfg = load_config(overrides=[f"storage={root}", "name=run", f"data.path={data_dir}",
                                 f"tokenizer.path={base.tokenizer.path}", *SMALL, "train.num_workers=1",
                                 "train.cpus_per_worker=1", "train.max_steps=2", "train.ckpt_every=1",
                                 "train.log_every=1", "train.eval_every=100",
                                 f"train.async_checkpoint={str(background).lower()}", "train.timeout_s=300"])
    pretrain(cfg, resume="auto", max_failures=0, samples=False)
    assert_untouched(cfg.run_dir, elsewhere, victim)


def test_the_loop_without_ray_does_the_same(tmp_path):
    import numpy as np

    root = str(tmp_path / "runs")
    elsewhere, victim = plant(storage.join(root, "run"), tmp_path)
    cfg = load_config(overrides=[f"storage={root}", "name=run", *SMALL, "model.vocab_size=64", "data.document_mask=false",
                                 "train.max_steps=2", "train.ckpt_every=1", "train.eval_every=100"])
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 64, (64, cfg.data.seq_len + 1))
    train_local(cfg, blocks, blocks[:8])
    assert_untouched(cfg.run_dir, elsewhere, victim)
