"""metrics.jsonl: a local row is appended (not the whole file rewritten and fsynced at every log
step, O(rows) each), truncation on resume or rollback keeps rows up to the step and drops the
rest, and a last line cut by a crash mid-append is left out on resume instead of crashing it."""

import json
import os

import pytest

from raylm.errors import DataError
from raylm.metrics import MetricsLog


def steps_on_disk(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_logged_row_is_appended_not_the_file_rewritten(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.log({"kind": "train", "step": 1, "loss": 2.0})
    inode = os.stat(tmp_path / "metrics.jsonl").st_ino
    for step in range(2, 5):
        log.log({"kind": "train", "step": step, "loss": 2.0})
    # An atomic rewrite (temporary file renamed over it) would give the file a new inode.
    assert os.stat(tmp_path / "metrics.jsonl").st_ino == inode
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4]


def test_truncate_then_log_keeps_rows_up_to_the_step_on_disk_and_in_memory(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in range(1, 7):
        log.log({"kind": "train", "step": step})
        if step % 3 == 0:
            log.log({"kind": "val", "step": step, "val_loss": 1.0})
    log.truncate(3)  # a rollback to ckpt 3: its rows stay, later ones go
    log.log({"kind": "rollback", "step": 3, "spike_step": 6})
    log.log({"kind": "train", "step": 4})
    assert steps_on_disk(tmp_path) == [1, 2, 3, 3, 3, 4]
    assert [r["step"] for r in MetricsLog(str(tmp_path)).rows] == [1, 2, 3, 3, 3, 4]


def test_a_last_line_cut_by_a_crash_is_left_out_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in (1, 2, 3):
        log.log({"kind": "train", "step": step, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1.0, "kind": "train", "st')  # the crash came mid-append
    resumed = MetricsLog(str(tmp_path))
    assert [r["step"] for r in resumed.rows] == [1, 2, 3]
    resumed.truncate(3)
    resumed.log({"kind": "train", "step": 4, "loss": 1.0})
    assert steps_on_disk(tmp_path) == [1, 2, 3, 4]  # the cut line is gone from the file too


def test_a_damaged_line_before_the_last_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2: not JSON"):
        MetricsLog(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[2]\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2: expected a JSON object"):
        MetricsLog(str(tmp_path))


def test_on_s3_rows_reach_the_object_at_flush_and_truncate_keeps_rows_up_to_the_step(monkeypatch):
    """Object storage has no append: nothing is written per row, the whole object at flush."""
    import raylm.metrics as M

    objects: dict[str, str] = {}
    monkeypatch.setattr(M.storage, "exists", lambda uri, s3=None: uri in objects)
    monkeypatch.setattr(M.storage, "read_text", lambda uri, s3=None: objects[uri])
    monkeypatch.setattr(M.storage, "write_text", lambda uri, text, s3=None: objects.__setitem__(uri, text))
    uri = "s3://bucket/runs/r/metrics.jsonl"
    log = MetricsLog("s3://bucket/runs/r")
    for step in range(1, 5):
        log.log({"kind": "train", "step": step})
    assert uri not in objects
    log.flush()
    log.log({"kind": "train", "step": 5})  # after the last checkpoint: lost with a crash, redone on resume
    resumed = MetricsLog("s3://bucket/runs/r")
    assert [r["step"] for r in resumed.rows] == [1, 2, 3, 4]
    resumed.truncate(2)  # a rollback to ckpt 2
    assert [json.loads(x)["step"] for x in objects[uri].splitlines()] == [1, 2]
