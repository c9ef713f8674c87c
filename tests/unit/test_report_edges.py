"""raylm report on the edges: a run still appending its metrics (last line not yet ended), a
run that has logged a single step (a line of one point draws nothing), a non-finite step, and
matplotlib missing (one line saying what to install)."""

import json
import sys

import numpy as np
import pytest

import raylm.eval.report as report
from raylm.cli import main
from raylm.errors import DataError


def write(run, rows, tail=""):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def test_a_row_being_appended_is_left_out(tmp_path):
    run = write(tmp_path / "r", [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2)],
                tail='{"kind": "train", "step": 3, "lo')
    _, rows = report.read_rows(str(run))
    assert [r["step"] for r in rows] == [1, 2]


def test_a_non_finite_step_is_a_one_line_error(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1}\n{"kind": "train", "step": NaN}\n')
    with pytest.raises(DataError, match="line 2: no numeric 'step'"):
        report.read_rows(str(run))


def test_a_run_of_one_row_draws_its_point(tmp_path, monkeypatch):
    figs = []
    real_png = report._png

    def keep(fig):  # the drawn pixels and where the point (10, 2.0) falls among them
        fig.tight_layout()
        fig.canvas.draw()
        x, y = fig.axes[0].transData.transform((10, 2.0))
        figs.append((x, y, np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0))
        return real_png(fig)

    monkeypatch.setattr(report, "_png", keep)
    report.plot_loss_curve([{"kind": "train", "step": 10, "loss": 2.0}], str(tmp_path / "loss.png"))
    x, y, rgb = figs[0]
    row, col = int(round(rgb.shape[0] - y)), int(round(x))
    patch = rgb[row - 2:row + 3, col - 2:col + 3]
    c0 = np.array([0x1F, 0x77, 0xB4]) / 255
    assert (np.abs(patch - c0).max(axis=-1) < 0.08).any(), "the single point is not drawn"


def test_matplotlib_missing_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    run = write(tmp_path / "r", [{"kind": "train", "step": 1, "loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(run), "--no-tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "matplotlib" in err and "pip install" in err
    assert not (run / "report").exists()
