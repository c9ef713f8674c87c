"""`raylm report`: real metrics files in, PNG and TensorBoard event files out, read back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from raylm.cli import main
from raylm.eval.report import EVENT_FILE, panel_names, load_runs, write_report

tbx = pytest.importorskip("tensorboardX")

# matplotlib's default colour cycle: C0 and C1, the first and second run.
C0, C1 = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255


def read_events(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TensorBoard event file: TFRecord framing (length, masked CRC32C of the
    length, payload, masked CRC of the payload) around `Event` protobufs, CRCs checked."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, pos, out = path.read_bytes(), 0, {}
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        payload = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(payload)
        pos += 16 + length
        event = Event.FromString(payload)
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def write_run(root: Path, name: str, scale: float, evals: bool = True) -> Path:
    """A run directory with a metrics.jsonl as `fit` writes it, plus in-training eval rows."""
    rows = []
    for step in range(10, 110, 10):
        rows.append({"kind": "train", "step": step, "loss": scale * 5 / step ** 0.3, "lr": 1e-3 * step / 100,
                     "grad_norm": 1.0, "tokens_per_s": 1000.0 * scale, "mfu": None, "time": 1.7e9 + step})
        if step % 50 == 0:
            rows.append({"kind": "val", "step": step, "val_loss": scale * 5.2 / step ** 0.3, "val_ppl": 9.0})
            if evals:
                rows.append({"kind": "eval", "step": step, "task": "mc", "acc": 0.3 + step / 1000 * scale,
                             "acc_stderr": 0.02, "checkpoint": f"ckpt-{step}"})
                # The in-training suite's row (raylm.eval.in_training): metrics named by task.
                rows.append({"kind": "eval", "step": step, "eval_wa_exact_match": 0.1 * scale,
                             "eval_wa_exact_match_stderr": 0.01, "eval_wa_n": 50})
    rows.insert(3, {"kind": "rollback", "step": 20, "spike_step": 30, "checkpoint": "ckpt-20"})
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def colour_pixels(png: Path, colour: np.ndarray) -> int:
    import matplotlib.image as mpimg

    rgb = mpimg.imread(png)[..., :3]
    return int((np.abs(rgb - colour).max(axis=-1) < 0.08).sum())


def test_tiny_run_report_png_and_tensorboard(tiny_run, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "report"
    summary = write_report([tiny_run], str(out))
    assert summary["panels"] == ["loss", "lr", "tokens_per_s"]
    image = mpimg.imread(out / "report.png")
    assert image.shape[:2] == (680, 1200)  # 2 x 2 panels of 6 x 3.4 inches at 100 dpi
    assert colour_pixels(out / "report.png", C0) > 500  # the curves are drawn, in the run's colour
    assert colour_pixels(out / "report.png", C1) == 0  # one run: one colour

    rows = [json.loads(x) for x in (Path(tiny_run) / "metrics.jsonl").read_text().splitlines()]
    events = read_events(out / "tensorboard" / "tiny" / EVENT_FILE)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _ in events["train/loss"]] == [s for s, _ in train]
    np.testing.assert_allclose([v for _, v in events["train/loss"]], [v for _, v in train], rtol=1e-6)
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "val"]
    assert events["val/val_loss"] == pytest.approx(val, rel=1e-6)
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm"} <= set(events)


def test_two_runs_overlaid_with_eval_panels(tmp_path):
    a, b = write_run(tmp_path, "a", 1.0), write_run(tmp_path, "b", 1.3)
    out = tmp_path / "cmp"
    summary = write_report([str(a), str(b)], str(out))
    assert summary["panels"] == ["loss", "lr", "tokens_per_s", "eval_wa_exact_match", "mc/acc"]
    assert set(summary["runs"]) == {"a", "b"}
    png = out / "report.png"
    assert colour_pixels(png, C0) > 300 and colour_pixels(png, C1) > 300  # both runs drawn
    for name, scale in (("a", 1.0), ("b", 1.3)):
        events = read_events(out / "tensorboard" / name / EVENT_FILE)
        assert [s for s, _ in events["eval/mc/acc"]] == [50, 100]
        assert events["eval/mc/acc"][1][1] == pytest.approx(0.3 + 0.1 * scale)
        assert events["eval/mc/acc_stderr"][0][1] == pytest.approx(0.02)
        assert "eval/mc/checkpoint" not in events  # text fields are not scalars
        assert len(events["train/loss"]) == 10
        assert events["eval/eval_wa_n"] == [(50, 50.0), (100, 50.0)]  # counts: TensorBoard only


def test_eval_rows_become_panels_with_stderr(tmp_path):
    (run,) = load_runs([str(write_run(tmp_path, "r", 1.0))])
    assert run.evals["mc/acc"] == [(50, pytest.approx(0.35), 0.02), (100, pytest.approx(0.4), 0.02)]
    assert "mc/acc_stderr" not in run.evals  # drawn as the error bar of mc/acc
    assert run.evals["eval_wa_exact_match"][0] == (50, pytest.approx(0.1), 0.01)
    assert "eval_wa_n" not in run.evals
    assert run.rollbacks == [20]
    assert "spike_step" not in str(panel_names([run]))  # events are not metrics
    (plain,) = load_runs([str(write_run(tmp_path, "p", 1.0, evals=False))])
    assert panel_names([plain]) == ["loss", "lr", "tokens_per_s"]


def test_loss_png_of_a_run_is_drawn_here(tmp_path):
    from raylm.metrics import plot_loss_curve

    rows = [json.loads(x) for x in (write_run(tmp_path, "r", 1.0) / "metrics.jsonl").read_text().splitlines()]
    plot_loss_curve(rows, str(tmp_path / "loss.png"))
    assert colour_pixels(tmp_path / "loss.png", C0) > 200


def test_cli_report_and_one_line_errors(tmp_path, capsys):
    run = write_run(tmp_path, "r", 1.0)
    assert main(["report", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["png"] == str(run / "report" / "report.png")
    assert (run / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(run), str(empty), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{empty}/metrics.jsonl: no such file" in err
    assert not (tmp_path / "x").exists()  # nothing written when one input is bad

    bad = write_run(tmp_path, "bad", 1.0)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # a line cut short, as a crash mid-write leaves it
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}/metrics.jsonl line 3: not JSON" in err

    assert main(["report", str(run), str(bad / "..")]) == 2  # several runs need --out
    assert "--out" in capsys.readouterr().err
