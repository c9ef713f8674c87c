"""What a run directory holds of steps that training does again goes before training starts.

A run that starts over (no complete checkpoint left to resume: the user removed them, and its
summary.json, to train again in the same directory) or resumes from an earlier checkpoint (a newer one removed) redoes
the steps after its start. The earlier run's results of those steps described other weights:
`<run>/eval/ckpt-N/` (`raylm eval` of a checkpoint that is gone, and that the new run writes
again at the same step), and the rows of metrics.jsonl after the start, in-training eval rows
among them. They went only as far as the worker's own truncation of metrics.jsonl, and
`<run>/eval/` not at all: a restarted run that failed before it got there, or evaluated only
its newest checkpoint, left them for a reader to take as this run's. Now the driver removes
them before it writes the new run's record (results of the checkpoints it resumes from, and
of earlier steps, stay). Real 1-worker Ray Train runs in local copies of one finished run.
"""

from __future__ import annotations

import shutil

import pytest

from raylm import checkpoint, storage
from raylm.config import load_config
from raylm.eval.report import write_report
from raylm.eval.run import evaluate_run
from raylm.metrics import read_metrics
from raylm.pipeline import forget_summary, pretrain
from tests.small import SMALL

pytestmark = pytest.mark.integration

ONE = ["train.num_workers=1", "train.cpus_per_worker=1"]
SCHEDULE = ["train.ckpt_every=2", "train.log_every=1", "train.eval_every=2", "train.async_checkpoint=false",
            "train.timeout_s=300", "eval.every=2", "eval.workers=0"]
MC = '{"context": "The cat", "choices": [" sat", " flew"], "gold": 0}\n'


def settings(prepared, root: str, mc: str, *more: str):
    base, data_dir, _ = prepared
    return load_config(overrides=[f"storage={root}", "name=run", f"data.path={data_dir}",
                                  f"tokenizer.path={base.tokenizer.path}", ("eval.mc_tasks", [mc]), *SMALL, *ONE,
                                  *SCHEDULE, *more])


def eval_dirs(run_dir: str) -> list[int]:
    return [step for step, _, _ in checkpoint.list_checkpoints(storage.join(run_dir, "eval"))]


def has_report(run_dir: str, s3=None) -> bool:
    return storage.exists(storage.join(run_dir, "report", "report.png"), s3) \
        or storage.exists(storage.join(run_dir, "report", "tensorboard"), s3)


def steps_logged(run_dir: str, kind: str) -> list[int]:
    uri = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [r["step"] for r in read_metrics(uri) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory):
    """(run dir, task file): a run finished at step 4 with in-training eval rows at steps 2
    and 4, `raylm eval` results of its checkpoints ckpt-2 and ckpt-4 in `<run>/eval/`, and
    `raylm report`'s drawing of its metrics in `<run>/report/`."""
    root = tmp_path_factory.mktemp("finished")
    mc = root / "mc.jsonl"
    mc.write_text(MC * 3)
    cfg = settings(prepared, str(root), str(mc), "train.max_steps=4")
    pretrain(cfg, resume="auto", max_failures=0, samples=False)
    for step in (2, 4):
        evaluate_run(storage.join(cfg.run_dir, checkpoint.checkpoint_name(step)), cfg, log=lambda *_: None)
    assert eval_dirs(cfg.run_dir) == [2, 4]
    assert steps_logged(cfg.run_dir, "eval") == [2, 4]
    write_report([cfg.run_dir])
    assert has_report(cfg.run_dir)
    return cfg.run_dir, str(mc)


def copy_of(finished, tmp_path, drop_steps) -> str:
    """A copy of the finished run under tmp_path/runs/run without the checkpoints of `drop_steps`."""
    run_dir = str(tmp_path / "runs" / "run")
    shutil.copytree(finished[0], run_dir)
    for step in drop_steps:
        shutil.rmtree(storage.join(run_dir, checkpoint.checkpoint_name(step)))
    return run_dir


def run_and_fail(prepared, finished, tmp_path, monkeypatch, step: int, resume: str) -> None:
    """Train the copy under tmp_path/runs to step 4, failing after `step`."""
    cfg = settings(prepared, str(tmp_path / "runs"), finished[1], "train.max_steps=4")
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", f"step={step},rank=0,kind=raise")
    with pytest.raises(Exception, match=f"injected failure at step {step}"):
        pretrain(cfg, resume=resume, max_failures=0, samples=False)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")


def test_a_finished_run_without_checkpoints_is_not_started_over_unasked(prepared, finished, tmp_path):
    """Its checkpoints removed (after an export, say), rerunning a finished run's command started
    it over without a word, deleting its metrics, report and eval results. Refused in one line
    before any work, everything kept."""
    from raylm.config import ConfigError

    run_dir = copy_of(finished, tmp_path, (2, 4))
    rows = storage.read_bytes(storage.join(run_dir, "metrics.jsonl"))
    cfg = settings(prepared, str(tmp_path / "runs"), finished[1], "train.max_steps=4")
    with pytest.raises(ConfigError, match=r"holds a finished run \(summary.json\) and no complete checkpoint.*remove "):
        pretrain(cfg, resume="auto", max_failures=0, samples=False)
    assert eval_dirs(run_dir) == [2, 4] and has_report(run_dir)
    assert storage.read_bytes(storage.join(run_dir, "metrics.jsonl")) == rows
    assert storage.exists(storage.join(run_dir, "summary.json"))


def test_a_run_started_over_keeps_no_eval_results_of_the_earlier_run(prepared, finished, tmp_path, monkeypatch):
    run_dir = copy_of(finished, tmp_path, (2, 4))  # nothing to resume: training starts at step 0
    storage.delete(storage.join(run_dir, "summary.json"))  # as the refusal above says, to train it again here
    run_and_fail(prepared, finished, tmp_path, monkeypatch, 1, "auto")  # before its first checkpoint
    assert steps_logged(run_dir, "eval") == [] and steps_logged(run_dir, "train") == [1]
    assert eval_dirs(run_dir) == [], "the earlier run's `raylm eval` results outlived a run started over"
    assert not has_report(run_dir)


def test_a_resume_from_an_earlier_checkpoint_keeps_the_results_up_to_it(prepared, finished, tmp_path, monkeypatch):
    run_dir = copy_of(finished, tmp_path, (4,))  # the newest removed: training resumes at step 2
    kept = storage.read_bytes(storage.join(run_dir, "eval", checkpoint.checkpoint_name(2), "results.json"))
    run_and_fail(prepared, finished, tmp_path, monkeypatch, 3, "must")
    assert steps_logged(run_dir, "eval") == [2] and steps_logged(run_dir, "train") == [1, 2, 3]
    assert eval_dirs(run_dir) == [2], "results of the removed ckpt-4 outlived the resume from ckpt-2"
    assert storage.read_bytes(storage.join(run_dir, "eval", checkpoint.checkpoint_name(2), "results.json")) == kept
    assert not has_report(run_dir)  # it drew steps 3 and 4 of the earlier run


def test_they_go_before_the_new_runs_record(prepared, finished, tmp_path):
    """The driver removes them before it writes the record (what a crash before the workers
    reach metrics.jsonl leaves): the old run's rows never sit beside the new run's record."""
    run_dir = copy_of(finished, tmp_path, (2, 4))
    cfg = settings(prepared, str(tmp_path / "runs"), finished[1], "train.max_steps=4")
    record = storage.read_text(storage.join(run_dir, "record.json"))
    forget_summary(cfg)
    assert not storage.exists(storage.join(run_dir, "metrics.jsonl")), "rows of the earlier run were kept"
    assert eval_dirs(run_dir) == [] and not has_report(run_dir)
    assert storage.read_text(storage.join(run_dir, "record.json")) == record

    resumed = copy_of(finished, tmp_path / "again", (4,))
    cfg = settings(prepared, str(tmp_path / "again" / "runs"), finished[1], "train.max_steps=4")
    forget_summary(cfg)
    assert eval_dirs(resumed) == [2] and not has_report(resumed)
    assert sorted({r["step"] for r in read_metrics(storage.join(resumed, "metrics.jsonl"))}) == [1, 2]

    # A continuation from the newest checkpoint redoes nothing: everything stays.
    whole = copy_of(finished, tmp_path / "whole", ())
    rows = storage.read_bytes(storage.join(whole, "metrics.jsonl"))
    cfg = settings(prepared, str(tmp_path / "whole" / "runs"), finished[1], "train.max_steps=6")
    forget_summary(cfg)
    assert eval_dirs(whole) == [2, 4] and has_report(whole)
    assert storage.read_bytes(storage.join(whole, "metrics.jsonl")) == rows


def test_the_same_on_s3(prepared, finished, s3_prefix):
    base = prepared[0]
    run_dir = storage.join(s3_prefix, "run")
    storage.upload_dir(finished[0], run_dir, base.s3)
    storage.delete(storage.join(run_dir, checkpoint.checkpoint_name(4)), base.s3)
    cfg = settings(prepared, s3_prefix, finished[1], "train.max_steps=4")
    forget_summary(cfg)  # resumes from ckpt-2
    assert [s for s, _, _ in checkpoint.list_checkpoints(storage.join(run_dir, "eval"), base.s3)] == [2]
    assert not has_report(run_dir, base.s3)
    assert sorted({r["step"] for r in read_metrics(storage.join(run_dir, "metrics.jsonl"), base.s3)}) == [1, 2]
    storage.delete(storage.join(run_dir, checkpoint.checkpoint_name(2)), base.s3)
    forget_summary(cfg)  # starts over
    assert not checkpoint.list_checkpoints(storage.join(run_dir, "eval"), base.s3)
    assert not storage.exists(storage.join(run_dir, "metrics.jsonl"), base.s3)
