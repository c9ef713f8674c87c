"""`raylm report --out DIR` drawn again into the same DIR replaces the whole report there, not
just the files it writes again: the event files of runs the new report leaves out (all of
them, with --no-tensorboard) go, or `tensorboard --logdir DIR/tensorboard` shows them as part
of it; and a redraw cut short leaves no report.png (whose presence means complete) beside new
event files. Files there that raylm did not write stay."""

from __future__ import annotations

import json

import pytest

from raylm import storage
from raylm.errors import StorageError
from raylm.eval.report import EVENT_FILE, write_report

pytest.importorskip("tensorboardX")


def runs(root) -> list[str]:
    made = []
    for name, loss in (("a", 2.0), ("b", 3.0), ("c", 4.0)):
        rows = [{"kind": "train", "step": s, "loss": loss / s, "lr": 0.1} for s in (1, 2, 3)]
        uri = storage.join(str(root), name)
        storage.write_text(storage.join(uri, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        made.append(uri)
    return made


def event_runs(out: str, s3=None) -> list[str]:
    tb = storage.join(out, "tensorboard")
    if not storage.exists(tb, s3):
        return []
    return [storage.relative(f.uri, tb).rsplit("/", 1)[0] for f in storage.list_files(tb, s3)
            if f.uri.endswith(EVENT_FILE)]


def test_a_redraw_keeps_the_event_files_of_its_own_runs_only(tmp_path):
    a, b, c = runs(tmp_path)
    out = str(tmp_path / "cmp")
    write_report([a, b], out)
    mine = tmp_path / "cmp" / "tensorboard" / "notes" / "mine.txt"
    mine.parent.mkdir()
    mine.write_text("not raylm's")
    assert event_runs(out) == ["a", "b"]
    write_report([a, c], out)
    assert event_runs(out) == ["a", "c"]
    write_report([a], out, tensorboard=False)
    assert event_runs(out) == []
    assert mine.read_text() == "not raylm's"


def test_a_redraw_cut_short_leaves_no_report_png(tmp_path):
    a, b, c = runs(tmp_path)
    out = tmp_path / "cmp"
    write_report([a, b], str(out))
    assert (out / "report.png").is_file()
    (out / "tensorboard" / "c").write_text("in the way")  # c's event file cannot be written
    with pytest.raises(StorageError):
        write_report([a, c], str(out))
    assert not (out / "report.png").exists(), "the earlier report's png reads as this one's, complete"


def test_the_same_on_s3(s3_prefix):
    a, b, c = runs(s3_prefix)
    out = storage.join(s3_prefix, "cmp")
    write_report([a, b], out)
    assert event_runs(out) == ["a", "b"]
    write_report([a, c], out)
    assert event_runs(out) == ["a", "c"]
