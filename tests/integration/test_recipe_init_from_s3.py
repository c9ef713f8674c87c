"""Recipes (raylm/recipe.py) against a real S3 server (SeaweedFS on loopback, tests/s3server.py):
a model stage that starts from a run in S3 outside the recipe (`init_from`) runs again once
that run commits a newer checkpoint (its listing's ETags). And a command refused inside the run
lock leaves no lease behind there. No Ray: the training stage is a stand-in."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

import raylm.recipe as R
from raylm import checkpoint, run_lock, storage
from raylm.errors import ConfigError
from raylm.recipe import load_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("s3_server")
QUIET = dict(log=lambda m: None)


def _commit(ck: str, content: str) -> None:
    storage.write_text(storage.join(ck, checkpoint.COMMIT_MARKER), content)


def test_pretraining_from_a_run_in_s3_that_trained_on_runs_again(s3_prefix, tmp_path, monkeypatch):
    from raylm.generate import resolve_checkpoint

    def run_pretrain(run):  # resumes its own checkpoint when there is one, as the real stage does
        own = Path(run.out) / checkpoint.checkpoint_name(2)
        if not own.exists():
            own.mkdir(parents=True)
            marker = storage.read_text(storage.join(resolve_checkpoint(run.cfg.init_from), checkpoint.COMMIT_MARKER))
            (own / checkpoint.COMMIT_MARKER).write_text("from " + marker)
        text = (own / checkpoint.COMMIT_MARKER).read_text()
        return {"path": run.out, "checkpoint": str(own), "sha256": hashlib.sha256(text.encode()).hexdigest()}

    stages = tuple(dataclasses.replace(s, run=run_pretrain) if s.name == "pretrain" else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})
    monkeypatch.setattr(R, "_trained_on_other_data", lambda cfg: False)
    outside = storage.join(s3_prefix, "outside")
    _commit(storage.join(outside, checkpoint.checkpoint_name(2)), "step 2")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n"
                    f"  pretrain: {{data.path: /c.txt, init_from: '{outside}'}}\n")
    run_recipe(load_recipe(str(path)), **QUIET)
    assert run_recipe(load_recipe(str(path)), **QUIET)["pretrain"]["skipped"]
    storage.write_text(storage.join(outside, "metrics.jsonl"), "{}\n")  # the run's other files: not read
    assert run_recipe(load_recipe(str(path)), **QUIET)["pretrain"]["skipped"]
    _commit(storage.join(outside, checkpoint.checkpoint_name(4)), "step 4")
    done = run_recipe(load_recipe(str(path)), **QUIET)["pretrain"]
    assert not done["skipped"]
    assert (Path(done["outputs"]["checkpoint"]) / checkpoint.COMMIT_MARKER).read_text() == "from step 4"


def test_a_command_refused_inside_the_lease_leaves_none(s3_prefix):
    run = storage.join(s3_prefix, "run")
    with pytest.raises(ConfigError):
        with run_lock.held(run):
            assert storage.exists(storage.join(run, run_lock.RUN_LOCK))
            raise ConfigError("refused")
    assert storage.list_files(run) == []
