"""metrics.jsonl rows with an odd step or no kind: a null or text step stopped a resuming run
(MetricsLog.truncate) with a TypeError, a huge step stopped `raylm report` inside tensorboardX,
a step of 1.5 was drawn at 1, and a row without a kind made a panel named "None/<key>"."""

import json

import pytest

import raylm.eval.report as report
from raylm.cli import main
from raylm.errors import DataError
from raylm.metrics import MetricsLog, read_metrics


def write(run, lines):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


@pytest.mark.parametrize("step", ["null", '"3"'])
def test_a_resume_over_a_null_or_text_step_is_a_one_line_error(tmp_path, step):
    run = write(tmp_path / "r", ['{"kind": "train", "step": 1, "loss": 2.0}\n',
                                 f'{{"kind": "train", "step": {step}, "loss": 1.0}}\n',
                                 '{"kind": "train", "step": 3, "loss": 1.0}\n'])
    before = (run / "metrics.jsonl").read_text()
    for read in (lambda: MetricsLog(str(run)).truncate(2), lambda: read_metrics(str(run / "metrics.jsonl"))):
        with pytest.raises(DataError, match=r"metrics.jsonl line 2: no numeric 'step' field"):
            read()
    assert (run / "metrics.jsonl").read_text() == before  # nothing rewritten


@pytest.mark.parametrize("step", ["1e300", "1.5", str(2**64)])
def test_report_refuses_a_step_tensorboard_cannot_hold(tmp_path, capsys, step):
    run = write(tmp_path / "r", ['{"kind": "train", "step": 1, "loss": 2.0}\n',
                                 f'{{"kind": "train", "step": {step}, "loss": 1.0}}\n'])
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl line 2: 'step'" in err and "whole number" in err
    assert not (run / "report").exists()


def test_a_whole_float_step_is_drawn(tmp_path):
    run = write(tmp_path / "r", ['{"kind": "train", "step": 1.0, "loss": 2.0}\n',
                                 '{"kind": "train", "step": 2, "loss": 1.0}\n'])
    _, rows = report.read_rows(str(run))
    assert report.series("r", "x", rows).train["loss"] == [(1, 2.0), (2, 1.0)]


def test_a_row_without_kind_is_named_metrics_not_none(tmp_path):
    run = write(tmp_path / "r", [json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 2.0}, {"kind": "", "step": 2, "x": 1.0}, {"step": 3, "task": "t", "acc": 0.5})])
    (loaded,) = report.load_runs([str(run)])
    assert set(loaded.evals) == {"metrics/loss", "metrics/x", "t/acc"}  # as TensorBoard's tags below
    data = report.tensorboard_events(loaded)
    assert b"None" not in data
    for tag in (b"metrics/loss", b"metrics/x", b"metrics/t/acc"):
        assert tag in data
