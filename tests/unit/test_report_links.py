"""`raylm report` never writes through a link where its own directories go: a link planted at
`<run>/report` (the default --out, inside a run directory others may write to) or at
`<out>/tensorboard` (or a run's folder under it) is refused in one line, with nothing written
and nothing removed where it points. Also: a metrics.jsonl byte that is not UTF-8, or a row
whose kind or task is not a string, is one line naming its line (they were tracebacks); more
than ten runs overlaid each get a colour of their own (the 11th was drawn in the 1st's); rows
that name a task keep their TensorBoard scalars apart (two tasks' acc at one step were mixed
under eval/acc)."""

import json
import os

import pytest

from raylm.cli import main
from raylm.config import ConfigError
from raylm.eval.report import EVENT_FILE, write_report


def run_dir(tmp_path, name="r"):
    run = tmp_path / name
    run.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 0.1} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def elsewhere(tmp_path):
    """Someone else's directory: a figure of theirs and an earlier report's event file."""
    other = tmp_path / "elsewhere"
    (other / "tensorboard" / "x").mkdir(parents=True)
    (other / "report.png").write_bytes(b"theirs")
    (other / "tensorboard" / "x" / EVENT_FILE).write_bytes(b"theirs")
    return other


def untouched(other) -> bool:
    return sorted(str(p.relative_to(other)) for p in other.rglob("*")) == \
        ["report.png", "tensorboard", "tensorboard/x", f"tensorboard/x/{EVENT_FILE}"] and \
        (other / "report.png").read_bytes() == b"theirs"


def test_a_link_at_the_runs_report_dir_is_refused(tmp_path, capsys):
    run, other = run_dir(tmp_path), elsewhere(tmp_path)
    os.symlink(other, run / "report")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{run / 'report'}: is a link" in err
    assert untouched(other)


@pytest.mark.parametrize("link", ["tensorboard", "tensorboard/r"])
def test_a_link_inside_out_is_refused_and_nothing_written(tmp_path, link):
    run, other, out = run_dir(tmp_path), elsewhere(tmp_path), tmp_path / "out"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(other / "tensorboard" if link == "tensorboard" else other, out / link)
    with pytest.raises(ConfigError, match=f"{out / link}: is a link"):
        write_report([str(run)], str(out))
    assert untouched(other) and not (out / "report.png").exists()


def test_an_out_dir_given_as_a_link_is_the_users_own(tmp_path):
    run, target = run_dir(tmp_path), tmp_path / "target"
    target.mkdir()
    os.symlink(target, tmp_path / "out")
    write_report([str(run)], str(tmp_path / "out"))
    assert (target / "report.png").exists() and (target / "tensorboard" / "r" / EVENT_FILE).exists()


def test_a_byte_that_is_not_utf8_is_one_line_naming_the_line(tmp_path, capsys):
    run = run_dir(tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 4, "note": "\xff"}\n')
    assert main(["report", str(run), "--no-tensorboard"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl line 4: not UTF-8 text" in err and "Traceback" not in err


def test_more_than_ten_runs_each_have_their_own_colour():
    from matplotlib.colors import to_hex

    from raylm.eval.report import colour

    for n in (10, 11, 20, 25):
        assert len({to_hex(colour(i, n)) for i in range(n)}) == n


@pytest.mark.parametrize("field", ['"kind": ["eval"]', '"kind": {"a": 1}', '"kind": "eval", "task": ["x"]'])
def test_a_kind_or_task_that_is_not_a_string_is_one_line(tmp_path, capsys, field):
    run = run_dir(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, %s, "acc": 0.5}\n' % field)
    assert main(["report", str(run), "--no-tensorboard"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl line 4: 'kind' and 'task' must be strings" in err


def test_tensorboard_keeps_each_tasks_scalars_apart(tmp_path):
    from tests.unit.test_report import read_events

    run = run_dir(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        for task, acc in (("arc", 0.25), ("hella", 0.5)):
            f.write(json.dumps({"kind": "eval", "step": 3, "task": task, "acc": acc}) + "\n")
    write_report([str(run)], str(tmp_path / "out"))
    events = read_events(tmp_path / "out" / "tensorboard" / "r" / EVENT_FILE)
    assert events["eval/arc/acc"] == [(3, 0.25)] and events["eval/hella/acc"] == [(3, 0.5)]
    assert "eval/acc" not in events
