"""A run's end-of-run outputs (summary.json, samples.txt, loss.png) describe the run as it was
when it last finished. When training starts again (a --resume, a larger train.max_steps) they
go, as summary.json always did: a continuation that then fails must not leave the earlier
run's samples and plot for a reader to take as the new run's. A refused resume changes
nothing and leaves them. Real 1-worker Ray Train runs: one finished run, continued (and failed
on purpose) in a local copy and in an s3:// copy of it.

Also here, as it needs the cluster: a streamed run's record.json lists the bad records its
stream skips (tests/unit/test_record_stream.py has the rest of that).
"""

from __future__ import annotations

import json
import shutil

import pytest

from raylm import storage
from raylm.config import load_config
from raylm.data import stream_datasets
from raylm.generate import load_tokenizer
from raylm.pipeline import pretrain
from raylm.record import write_record
from tests.small import SMALL

pytestmark = pytest.mark.integration

ONE = ["train.num_workers=1", "train.cpus_per_worker=1"]
SCHEDULE = ["train.ckpt_every=2", "train.log_every=1", "train.eval_every=2", "train.async_checkpoint=false",
            "train.timeout_s=300"]
END_OF_RUN = ("summary.json", "samples.txt", "loss.png")


def settings(prepared, root: str, *more: str):
    base, data_dir, _ = prepared
    return load_config(overrides=[f"storage={root}", "name=run", f"data.path={data_dir}",
                                  f"tokenizer.path={base.tokenizer.path}", *SMALL, *ONE, *SCHEDULE, *more])


@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory):
    """A run that finished at step 2 with its samples, plot and summary (a local directory)."""
    root = str(tmp_path_factory.mktemp("finished"))
    cfg = settings(prepared, root, "train.max_steps=2")
    pretrain(cfg, resume="auto", max_failures=0, samples=True)
    for name in END_OF_RUN:
        assert storage.exists(storage.join(cfg.run_dir, name)), name
    return cfg.run_dir


def continue_and_fail(prepared, root: str, monkeypatch) -> str:
    """Continue the run under `root` to step 4, rank 0 failing after step 3; returns the run dir."""
    cfg = settings(prepared, root, "train.max_steps=4")
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=3,rank=0,kind=raise")
    with pytest.raises(Exception, match="injected failure at step 3"):
        pretrain(cfg, resume="must", max_failures=0, samples=True)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    assert storage.exists(storage.join(cfg.run_dir, "injected-failure-3"), cfg.s3), "training never got to step 3"
    return cfg.run_dir


def test_a_failed_continuation_leaves_no_earlier_end_of_run_outputs(prepared, finished, tmp_path, monkeypatch):
    root = str(tmp_path / "runs")
    run_dir = storage.join(root, "run")
    shutil.copytree(finished, run_dir)
    old = {name: storage.read_bytes(storage.join(run_dir, name)) for name in END_OF_RUN}

    # A refused resume (another model) changes nothing in the run: its outputs stay.
    with pytest.raises(Exception, match="model.dim"):
        pretrain(settings(prepared, root, "train.max_steps=4", "model.dim=32"), resume="must", samples=True)
    assert {name: storage.read_bytes(storage.join(run_dir, name)) for name in END_OF_RUN} == old

    continue_and_fail(prepared, root, monkeypatch)
    left = [name for name in END_OF_RUN if storage.exists(storage.join(run_dir, name))]
    assert not left, f"the finished run's {left} outlived a continuation that failed"


def test_the_same_on_s3(prepared, finished, s3_prefix, monkeypatch):
    base = prepared[0]
    run_dir = storage.join(s3_prefix, "run")
    storage.upload_dir(finished, run_dir, base.s3)
    for name in END_OF_RUN:
        assert storage.exists(storage.join(run_dir, name), base.s3), name
    continue_and_fail(prepared, s3_prefix, monkeypatch)
    left = [name for name in END_OF_RUN if storage.exists(storage.join(run_dir, name), base.s3)]
    assert not left, f"the finished run's {left} outlived a continuation that failed"


def test_a_streamed_runs_record_lists_the_bad_records_it_skips(prepared, tmp_path):
    base = prepared[0]
    docs = tmp_path / "docs"
    docs.mkdir()
    good = [json.dumps({"text": f"document number {i} says something of its own. " * 4}) for i in range(30)]
    (docs / "a.jsonl").write_text("\n".join(good[:5] + ["not json"] + good[5:]) + "\n")
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=streamed", f"data.path={docs}", "data.mode=stream",
                                 "data.max_bad_records=3", *SMALL])
    tok = load_tokenizer(base.tokenizer.path, base.s3)
    _, manifest = stream_datasets(cfg.data, tok, cfg.seed, base.s3, log=lambda *_: None)
    record = json.loads(storage.read_text(write_record(cfg, "pretrain", tok, manifest)))
    assert record["data"]["mode"] == "stream"
    assert record["data"]["bad_records"] == [f"{docs}/a.jsonl:6: malformed JSON (Expecting value at column 1)"]
