"""Output and run paths holding `*` or `?` are names, not patterns: listing them for cleanup
or for checkpoints must never reach another path the pattern would match (storage.list_files
with pattern=False)."""

import json

from raylm import checkpoint
from raylm.data import remove_stale_attempts


def test_stale_attempts_of_a_wildcard_output_stay_inside_it(tmp_path):
    out = tmp_path / "prep*"
    (out / "attempt-old" / "train").mkdir(parents=True)
    (out / "attempt-old" / "train" / "shard-00000.parquet").write_bytes(b"x")
    (out / "attempt-new").mkdir()
    (out / "attempt-new" / "manifest.json").write_text("{}")
    (tmp_path / "prepare.py").write_text("print('not data')\n")  # matches the pattern prep*
    (tmp_path / "prep-other" / "attempt-old").mkdir(parents=True)  # so does this
    (tmp_path / "prep-other" / "attempt-old" / "f").write_text("kept")
    remove_stale_attempts(str(out), "attempt-new", None)
    assert sorted(p.name for p in out.iterdir()) == ["attempt-new"]
    assert (tmp_path / "prepare.py").exists() and (tmp_path / "prep-other" / "attempt-old" / "f").exists()


def test_checkpoints_of_a_wildcard_run_path_are_its_own(tmp_path):
    run, other = tmp_path / "r?", tmp_path / "r2"
    for d in (run, other):
        (d / "ckpt-00000004").mkdir(parents=True)
    (other / "ckpt-00000008").mkdir()
    (other / "ckpt-00000008" / checkpoint.COMMIT_MARKER).write_text(json.dumps({"step": 8, "files": {}}))
    (run / "ckpt-00000004" / checkpoint.COMMIT_MARKER).write_text(json.dumps({"step": 4, "files": {}}))
    found = checkpoint.list_checkpoints(str(run))
    assert [(step, done) for step, _, done in found] == [(4, True)]
    assert checkpoint.latest_complete(str(run)) == str(run / "ckpt-00000004")
