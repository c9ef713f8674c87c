"""raylm report on damaged or irregular histories: a step logged twice (the later row is the
run's), a finite loss between non-finite ones (drawn, not lost in the line's gaps), and the
summary saying what the plot left out (a cut last line, null and non-finite values)."""

import json
import math

import numpy as np

import raylm.eval.report as report


def write(run, rows, tail=""):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(report.row_json(r) + "\n" for r in rows) + tail)
    return run


def test_a_step_logged_again_draws_the_later_row(tmp_path):
    """Rows of steps 2 and 3 logged again (a resume from step 1 that kept the rows it redid):
    the curve goes 1, 2, 3 with the later values, not back and forth through both."""
    rows = [{"kind": "train", "step": s, "loss": v} for s, v in ((1, 5.0), (2, 4.0), (3, 9.0), (2, 3.9), (3, 3.5))]
    rows.append({"kind": "val", "step": 3, "val_loss": 8.0})
    rows.append({"kind": "val", "step": 3, "val_loss": 3.6})
    run = write(tmp_path / "r", rows)
    (loaded,) = report.load_runs([str(run)])
    assert loaded.train["loss"] == [(1, 5.0), (2, 3.9), (3, 3.5)]
    assert loaded.val["val_loss"] == [(3, 3.6)]
    summary = report.write_report([str(run)], tensorboard=False)
    assert any("3 row(s) of a step logged again" in s for s in summary["skipped"]["r"])


def test_a_finite_loss_between_non_finite_ones_is_drawn(tmp_path, monkeypatch):
    figs = []
    real_png = report._png

    def keep(fig):  # the drawn pixels and where the point (2, 3.0) falls among them
        fig.tight_layout()
        fig.canvas.draw()
        x, y = fig.axes[0].transData.transform((2, 3.0))
        figs.append((x, y, np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0))
        return real_png(fig)

    monkeypatch.setattr(report, "_png", keep)
    rows = [{"kind": "train", "step": 1, "loss": math.nan}, {"kind": "train", "step": 2, "loss": 3.0},
            {"kind": "train", "step": 3, "loss": math.inf}]
    report.plot_loss_curve(rows, str(tmp_path / "loss.png"))
    x, y, rgb = figs[0]
    row, col = int(round(rgb.shape[0] - y)), int(round(x))
    patch = rgb[row - 2:row + 3, col - 2:col + 3]
    c0 = np.array([0x1F, 0x77, 0xB4]) / 255
    assert (np.abs(patch - c0).max(axis=-1) < 0.08).any(), "the finite point is not drawn"


def test_the_summary_says_what_was_left_out(tmp_path, capsys):
    rows = [{"kind": "train", "step": 1, "loss": 5.0, "lr": 1e-3, "mfu": None},
            {"kind": "train", "step": 2, "loss": None, "lr": 1e-3, "mfu": None},  # an empty step
            {"kind": "train", "step": 3, "loss": math.nan, "lr": 1e-3, "mfu": None},
            {"kind": "train", "step": 4, "loss": 4.0, "lr": 1e-3, "mfu": None}]
    run = write(tmp_path / "r", rows, tail='{"kind": "train", "step": 5, "lo')  # killed mid-write
    from raylm.cli import main

    main(["report", "--no-tensorboard", str(run)])
    skipped = json.loads(capsys.readouterr().out)["skipped"]["r"]
    assert skipped[0].startswith("the last line") and "cut short" in skipped[0]
    assert "loss at step 2: null, not drawn" in skipped
    assert "loss at step 3: NaN, a gap in the line" in skipped
    assert not any("mfu" in s for s in skipped)  # null on CPUs, and not drawn anyway
    clean = write(tmp_path / "clean", rows[:1])
    assert report.write_report([str(clean)], tensorboard=False)["skipped"] == {}


def test_a_task_file_named_as_a_harness_task_is_refused(tmp_path, capsys):
    """`--tasks mini --mc tasks/mini.jsonl` wrote two `mini | acc` rows to results.md, one lm-eval's
    and one the built-in scorer's, told apart by nothing in the table. Refused before any work."""
    from raylm.cli import main

    task = tmp_path / "mini.jsonl"
    task.write_text('{"context": "x", "choices": ["a", "b"], "gold": 0}\n')
    assert main(["eval", str(tmp_path / "no-run"), "--tasks", "mini", "--mc", str(task), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: ") and "mini.jsonl is task 'mini', as is the lm-eval task" in err
    assert "\n" not in err
