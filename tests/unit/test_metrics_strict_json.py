"""metrics.jsonl is strict JSON: a NaN loss or an infinite gradient norm is written as null and
named under "non_finite", never as Python's bare NaN/Infinity tokens (which jq, JavaScript and
dashboards refuse, and with them the whole file). raylm's own reader (resume, `raylm report`)
gets the floats back, and reads files written before with the bare tokens."""

import json
import math

import pytest

from raylm.eval import report
from raylm.metrics import MetricsLog


def strict(line: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


ROWS = [
    {"kind": "train", "step": 1, "loss": 2.5, "grad_norm": 1.0, "mfu": None},
    {"kind": "train", "step": 2, "loss": math.nan, "grad_norm": math.inf, "mfu": None},
    {"kind": "val", "step": 2, "val_loss": -math.inf, "val_ppl": math.nan, "val_tokens": 64},
]


def test_non_finite_values_are_strict_json_and_read_back_as_floats(tmp_path):
    log = MetricsLog(str(tmp_path))
    for row in ROWS:
        log.log(row)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [strict(x) for x in lines]  # appended lines
    assert parsed[1]["loss"] is None and parsed[1]["grad_norm"] is None and parsed[1]["mfu"] is None
    assert parsed[1]["non_finite"] == {"loss": "NaN", "grad_norm": "Infinity"}
    assert parsed[2]["non_finite"] == {"val_loss": "-Infinity", "val_ppl": "NaN"}
    assert "non_finite" not in parsed[0]

    log.flush()  # the whole-file rewrite (object storage, checkpoints) writes the same lines
    assert [strict(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == parsed

    resumed = MetricsLog(str(tmp_path)).rows  # a resuming run's reader
    assert math.isnan(resumed[1]["loss"]) and resumed[1]["grad_norm"] == math.inf
    assert resumed[1]["mfu"] is None  # a value that was null stays None
    assert resumed[2]["val_loss"] == -math.inf and math.isnan(resumed[2]["val_ppl"])
    assert all("non_finite" not in r for r in resumed)
    assert {k: v for k, v in resumed[0].items() if k != "time"} == ROWS[0]

    _, rows = report.read_rows(str(tmp_path))  # raylm report's reader
    run = report.series("r", "x", rows)
    assert run.train["loss"][0] == (1, 2.5) and math.isnan(run.train["loss"][1][1])
    assert run.val["val_loss"] == [(2, -math.inf)]


def test_files_with_bare_nan_tokens_stay_readable(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss": NaN, "grad_norm": Infinity}\n'
        '{"kind": "val", "step": 1, "val_loss": 2.0}\n')
    log = MetricsLog(str(tmp_path))
    assert math.isnan(log.rows[0]["loss"]) and log.rows[0]["grad_norm"] == math.inf
    log.truncate(1)  # a resume rewrites the file: strict JSON from then on
    first = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["non_finite"] == {"loss": "NaN", "grad_norm": "Infinity"}


def test_a_damaged_non_finite_mark_is_ignored_not_fatal(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss": 3.0, "non_finite": {"loss": "NaN"}}\n'  # not null: kept
        '{"kind": "train", "step": 2, "loss": null, "non_finite": {"loss": "huge"}}\n'
        '{"kind": "train", "step": 3, "loss": null, "non_finite": "NaN"}\n')
    rows = MetricsLog(str(tmp_path)).rows
    assert [r["loss"] for r in rows] == [3.0, None, None]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nested_non_finite_value_is_null(value):
    assert strict(report.row_json({"step": 1, "per_task": {"a": value, "b": [1.0, value]}})) == {
        "step": 1, "per_task": {"a": None, "b": [1.0, None]}}
