"""`raylm report --out DIR` into a directory that already holds a report.png: a report raylm
drew there before is replaced (drawing a report again into its own directory is normal), a
file of that name raylm did not draw is kept and the command is refused in one line, with
nothing written."""

import json

import pytest

from raylm.cli import main
from raylm.eval import report


def run_dir(tmp_path, name="r", loss=2.0):
    run = tmp_path / name
    run.mkdir()
    rows = [{"kind": "train", "step": s, "loss": loss / s, "lr": 0.1} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_report_drawn_again_into_its_out_dir_is_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(run_dir(tmp_path)), "--out", str(out), "--no-tensorboard"]) == 0
    first = (out / "report.png").read_bytes()
    assert report.png_software(first) == report.PNG_SOFTWARE
    assert main(["report", str(run_dir(tmp_path, "s", 9.0)), "--out", str(out), "--no-tensorboard"]) == 0
    assert (out / "report.png").read_bytes() != first  # the new runs' report
    capsys.readouterr()


@pytest.mark.parametrize("content", [b"my own notes\n", None])
def test_a_report_png_raylm_did_not_draw_is_kept_and_refused_in_one_line(tmp_path, capsys, content):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "out"
    out.mkdir()
    png = out / "report.png"
    if content is None:  # someone's own figure, a real PNG
        fig, ax = plt.subplots()
        ax.plot([1, 2], [3, 4])
        fig.savefig(png)
        plt.close(fig)
        content = png.read_bytes()
    else:
        png.write_bytes(content)
    assert main(["report", str(run_dir(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{png}: exists and is not a report drawn by raylm report" in err
    assert png.read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == ["report.png"]  # no TensorBoard files either


def test_the_default_out_dir_is_raylms_own(tmp_path):
    """RUN/report is the run's own report directory: a report.png there (one drawn by a raylm
    from before reports were marked) is replaced."""
    run = run_dir(tmp_path)
    (run / "report").mkdir()
    (run / "report" / "report.png").write_bytes(b"\x89PNG\r\n\x1a\nan older report")
    summary = report.write_report([str(run)], tensorboard=False)
    assert report.png_software((run / "report" / "report.png").read_bytes()) == report.PNG_SOFTWARE
    assert summary["png"] == str(run / "report" / "report.png")
