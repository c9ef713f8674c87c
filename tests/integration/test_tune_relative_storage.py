"""The README's `raylm tune` command as a user types it: from a working directory, with the
default `storage` (`./runs`, relative). Each trial is documented as a normal raylm run under
`<storage>/<name>/runs/<trial id>/`; Tune runs each trial in a directory of its own, where
a relative storage path names another place (Ray's session directory under /tmp/ray)."""

from __future__ import annotations

import pytest

from raylm import checkpoint
from tests.small import SMALL
from tests.tune_search import write_corpus_slice

pytestmark = pytest.mark.integration

SPACE = """\
train.lr: grid_search([3.0e-3])
tune: {scheduler: fifo, max_concurrent_trials: 1}
"""


def test_trials_of_a_search_under_a_relative_storage_are_in_the_search_directory(ray_local, tmp_path,
                                                                                   monkeypatch):
    from raylm import tune
    from raylm.config import load_config

    monkeypatch.chdir(tmp_path)
    write_corpus_slice(tmp_path / "corpus.jsonl")
    (tmp_path / "space.yaml").write_text(SPACE)
    # storage as the defaults give it: "./runs", relative to where the command runs
    cfg = load_config(overrides=["name=rel-search", *SMALL, "data.dedup=none", "data.val_fraction=0.1",
                                 "data.path=corpus.jsonl", "train.num_workers=1", "train.max_steps=2",
                                 "train.eval_every=2", "train.ckpt_every=100", "train.timeout_s=300"])
    assert cfg.storage == "./runs"
    summary = tune.tune(cfg, "space.yaml")
    assert summary["trials"] == 1 and not summary["errors"], summary
    run = tmp_path / "runs" / "rel-search" / "runs" / summary["best_trial"]
    assert (run / "record.json").is_file(), f"the trial's run is not under the search directory: {run}"
    assert (run / "metrics.jsonl").is_file()
    assert checkpoint.latest_complete(str(run)) is not None
