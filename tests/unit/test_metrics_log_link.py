"""metrics.jsonl in a run directory others can write to: a link planted in its place is
replaced by the run's own file, never appended through (which wrote the run's rows into the
file it names, anywhere the user could write)."""

import json
import os

from raylm.metrics import MetricsLog


def test_a_planted_metrics_link_is_replaced_not_appended_through(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    os.symlink(victim, run / "metrics.jsonl")
    log = MetricsLog(str(run))
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5})
    assert victim.read_text() == "", "metrics were appended through a planted link"
    assert not os.path.islink(run / "metrics.jsonl")
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
