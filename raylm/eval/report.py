"""`raylm report`: runs' `metrics.jsonl` drawn as PNG panels and written as TensorBoard events.

This module is raylm's one plotting place: the run's own `loss.png` (`plot_loss_curve`) and
the report's panels are drawn by the same code.

Rows come from `raylm.metrics.MetricsLog`, written by `raylm.train.fit`:
  kind=train   loss, lr, grad_norm, tokens_per_s, mfu, ... at every log step
  kind=val     val_loss, val_ppl (or DPO's val_* metrics) at every evaluation
  other kinds  benchmark results logged during training (in-training evaluation): every
               numeric field is a metric with one panel of its own, named `<key>` for
               kind=eval and `<kind>/<key>`, or `<task>/<key>` when the row names a task;
               a `<key>_stderr` field becomes the error bar of `<key>`, and sample counts
               (`n`, `*_n`) are left to TensorBoard.
  kind=rollback  a restored checkpoint: drawn as a dotted line on the loss panel.

Several runs are overlaid, one colour per run. TensorBoard gets every numeric field of every
row as the scalar `<kind>/<key>` (tensorboardX: it writes the event format itself and needs only
protobuf, where torch.utils.tensorboard needs the whole tensorboard package).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field

from raylm import storage
from raylm.config import ConfigError, S3Config
from raylm.errors import DataError, PathNotFoundError
from raylm.eval.results import finite

# Fields that place a row rather than measure something.
_NOT_METRICS = {"step", "time"}
# The train and val fields the report draws (its loss, learning-rate and throughput panels).
_DRAWN = {"train": ("loss", "lr", "tokens_per_s"), "val": ("val_loss",)}
# Row kinds that mark events, not measurements.
_EVENT_KINDS = {"rollback"}
# One event file per run under a fixed name: a second `raylm report` replaces it instead of
# adding another file that TensorBoard would merge into duplicate points. TensorBoard reads
# any file whose name contains "tfevents".
EVENT_FILE = "events.out.tfevents.raylm-report"


@dataclass
class RunMetrics:
    """One run's series, as (step, value) pairs; `evals` values are (step, value, stderr)."""

    label: str
    uri: str  # the metrics.jsonl read
    rows: list[dict]
    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    val: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    evals: dict[str, list[tuple[int, float, float | None]]] = field(default_factory=dict)
    rollbacks: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what was not drawn, and why (the report says it)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# metrics.jsonl is strict JSON, which has no NaN or infinity (jq, JavaScript and dashboards
# refuse Python's bare NaN/Infinity tokens, and with them the whole file): a non-finite value
# is written as null, and the row names it under NON_FINITE ({"loss": null, ...,
# "non_finite": {"loss": "NaN"}}), from which `metrics_rows` restores it. Files written before
# hold the bare tokens, which `metrics_rows` still reads.
NON_FINITE = "non_finite"
_NON_FINITE_TEXT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _non_finite_text(v: float) -> str:
    return "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"




def row_json(row: dict) -> str:
    """One metrics.jsonl line (no newline) of `row`, strict JSON: a non-finite top-level value
    is null and named, with its value, under NON_FINITE; nested ones are null."""
    bad = {k: _non_finite_text(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        row = {**{k: None if k in bad else v for k, v in row.items()}, NON_FINITE: bad}
    return json.dumps(finite(row), allow_nan=False)


def _restore_non_finite(row: dict) -> dict:
    named = row.pop(NON_FINITE, None)
    if isinstance(named, dict):
        for key, text in named.items():
            if row.get(key) is None and text in _NON_FINITE_TEXT:
                row[key] = _NON_FINITE_TEXT[text]
    return row


def metrics_rows(text: str, shown: str, check=None) -> list[dict]:
    """The rows of a metrics.jsonl's `text` (`shown`: its name in errors), for reports and for a
    resuming run (raylm.metrics.MetricsLog). A last line with no newline yet (a row being
    appended by a running job, or cut by a crash) is left out; a damaged line before it, or a
    row that is not an object, is a one-line error naming the line. `check(row, where)` may
    refuse a row too. Non-finite values come back as floats (NaN, inf), whether written as
    null with their NON_FINITE names or, in older files, as bare NaN/Infinity tokens."""
    rows = []
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise DataError(f"{shown} line {n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{shown} line {n}: expected a JSON object, got {type(row).__name__}")
        row = _restore_non_finite(row)
        if check is not None:
            check(row, f"{shown} line {n}")
        rows.append(row)
    return rows


# TensorBoard's steps are int64: a larger one stopped `raylm report` in tensorboardX.
_MAX_STEP = 2**63 - 1


def check_step(row: dict, where: str) -> None:
    step = row.get("step")
    if not _number(step) or (isinstance(step, float) and not math.isfinite(step)):
        raise DataError(f"{where}: no numeric 'step' field")
    if step != int(step) or abs(step) > _MAX_STEP:  # 1.5 was drawn at step 1
        raise DataError(f"{where}: 'step' {step!r} is not a whole number of at most {_MAX_STEP}")
    if not isinstance(row.get("kind", ""), str) or not isinstance(row.get("task", ""), str):
        raise DataError(f"{where}: 'kind' and 'task' must be strings")


def read_rows(run: str, s3: S3Config | None = None) -> tuple[str, list[dict]]:
    """The rows of `<run>/metrics.jsonl` (local or s3://), or a one-line error naming the file
    and, for a bad row, its line."""
    uri, rows, _ = _read_run(run, s3)
    return uri, rows


def _read_run(run: str, s3: S3Config | None) -> tuple[str, list[dict], str | None]:
    """`read_rows`, and the note of `_read_rows_noting_cut`."""
    uri = storage.join(run, "metrics.jsonl")
    shown = storage.redact_url(uri)  # messages reach terminals and logs
    if not storage.exists(uri, s3):
        raise PathNotFoundError(f"{shown}: no such file (is {run} a raylm run directory?)")
    try:
        text = storage.read_text(uri, s3)
    except UnicodeDecodeError as e:  # damage (raylm writes ASCII): one line naming it
        from raylm.metrics import metrics_text

        text = metrics_text(e.object, shown)
    rows, cut = _read_rows_noting_cut(text, shown)
    if not rows:
        raise DataError(f"{shown}: no rows (the run has not logged a step yet)")
    return uri, rows, cut


def _read_rows_noting_cut(text: str, shown: str) -> tuple[list[dict], str | None]:
    """`metrics_rows` of `text`, and a note when its last line was left out (cut short: a row
    being appended, or a run killed mid-write)."""
    rows = metrics_rows(text, shown, check_step)
    last = text.split("\n")[-1]
    if last.strip():
        try:
            json.loads(last)
        except json.JSONDecodeError:
            return rows, f"the last line ({len(last.encode())} bytes, no newline) is cut short: left out"
    return rows, None


def _latest_per_step(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows with only the last one of each (kind, task, step). Training drops the rows a
    resume or rollback redoes (raylm.metrics.MetricsLog.truncate); a file where they remain
    (joined or copied by hand, or written by another tool) holds both, and the later row is the
    run's own history: drawn as well, the line went back and forth. Event rows (a rollback)
    are all kept."""
    last: dict = {}
    for i, row in enumerate(rows):
        if _number(row.get("step")) and row.get("kind") not in _EVENT_KINDS:
            last[(row.get("kind"), row.get("task"), row["step"])] = i
    kept = [row for i, row in enumerate(rows) if not (_number(row.get("step")) and row.get("kind")
            not in _EVENT_KINDS and last[(row.get("kind"), row.get("task"), row["step"])] != i)]
    return kept, len(rows) - len(kept)


def _steps_text(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:5]) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")
    return f"step {shown}" if len(steps) == 1 else f"steps {shown}"


def series(label: str, uri: str, rows: list[dict]) -> RunMetrics:
    """Split rows into train, validation and evaluation series, in step order. A step logged
    twice keeps its last row (`_latest_per_step`). A null value is left out (an empty step), a
    non-finite one kept (the line breaks there), and `skipped` says which, with their steps,
    as it says how many repeated rows were replaced."""
    rows, replaced = _latest_per_step(rows)
    run = RunMetrics(label, uri, rows)
    if replaced:
        run.skipped.append(f"{replaced} row(s) of a step logged again later (a resumed or rolled-back run's "
                           f"rows not dropped): the later row drawn")
    left_out: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        if not _number(row.get("step")):  # read_rows refuses these; a caller's own rows may hold one
            continue
        kind, step = row.get("kind"), int(row["step"])
        if kind in _EVENT_KINDS:
            if kind == "rollback":
                run.rollbacks.append(step)
            continue
        target = run.train if kind == "train" else run.val if kind == "val" else None
        for key, value in row.items():
            if key in _NOT_METRICS or key.endswith("_stderr") and target is None or _is_count(key) and target is None:
                continue
            if (value is None or _number(value) and not math.isfinite(value)) and \
                    (target is None or key in _DRAWN.get(kind, ())):  # mfu is null on CPUs: not drawn
                name = key if target is not None else _eval_name(kind, row, key)
                why = "null, not drawn" if value is None else \
                    f"{'NaN' if math.isnan(value) else 'infinite'}, a gap in the line"
                left_out.setdefault((name, why), []).append(step)
            if not _number(value):
                continue
            if target is not None:
                target.setdefault(key, []).append((step, float(value)))
            else:
                stderr = row.get(f"{key}_stderr")
                run.evals.setdefault(_eval_name(kind, row, key), []).append(
                    (step, float(value), float(stderr) if _number(stderr) and math.isfinite(stderr) else None))
    for points in (*run.train.values(), *run.val.values(), *run.evals.values()):
        points.sort(key=lambda p: p[0])
    run.rollbacks.sort()
    for (name, why), steps in left_out.items():
        run.skipped.append(f"{name} at {_steps_text(steps)}: {why}")
    return run


def _is_count(key: str) -> bool:
    """A sample count (`n`, `eval_<task>_n`): the size behind a metric, not a metric to draw."""
    return key == "n" or key.endswith("_n")


def _eval_name(kind, row: dict, key: str) -> str:
    task = row.get("task")
    if isinstance(task, str) and task:
        return f"{task}/{key}"
    return key if kind == "eval" else f"{kind or 'metrics'}/{key}"  # as TensorBoard's tags: not "None/loss"


def load_runs(runs: list[str], s3: S3Config | None = None) -> list[RunMetrics]:
    """Read every run first, so a bad one fails before anything is written."""
    labels = _labels(runs)
    loaded = []
    for run, label in zip(runs, labels):
        uri, rows, cut = _read_run(run, s3)
        metrics = series(label, uri, rows)
        if cut:
            metrics.skipped.insert(0, cut)
        loaded.append(metrics)
    return loaded


def _labels(runs: list[str]) -> list[str]:
    """Each run's last path segment, or more of its path where two would read the same."""
    parts = [(r if storage.is_s3(r) else os.path.abspath(r)).rstrip("/").split("/") for r in runs]
    depth = 1
    while depth < max(len(p) for p in parts):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    labels = ["/".join(p[-depth:]) for p in parts]
    return labels if len(set(labels)) == len(labels) else [f"{i}:{lab}" for i, lab in enumerate(labels)]


# --------------------------------------------------------------------------- drawing


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("raylm draws its plots with matplotlib, which is not installed: "
                          "pip install 'matplotlib>=3.7' (or reinstall raylm)") from None

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


# The PNG's Software text: how `write_report` knows a report.png as one raylm drew, which it
# may replace, from a file of that name it must not.
PNG_SOFTWARE = "raylm report"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    return buf.getvalue()


def png_software(data: bytes) -> str | None:
    """The Software text of a PNG (its tEXt chunk), or None: not a PNG, or none given."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    i = len(_PNG_SIGNATURE)
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind == b"tEXt":
            key, _, value = data[i + 8:i + 8 + length].partition(b"\0")
            if key == b"Software":
                return value.decode("latin-1")
        if kind == b"IEND":
            break
        i += 12 + length  # length, type, body, CRC
    return None


def _lone(points: list) -> dict:
    """Markers for a series with a point that has no finite neighbour (a run that has logged
    one step, a finite loss between NaN or infinite ones): a line needs two finite points, so
    that point would not be drawn at all."""
    finite_ = [math.isfinite(p[1]) for p in points]
    alone = any(ok and not (i and finite_[i - 1]) and not (i + 1 < len(finite_) and finite_[i + 1])
                for i, ok in enumerate(finite_))
    return {"marker": "o", "markersize": 4} if alone else {}


def colour(i: int, n: int):
    """Run i's colour of n: matplotlib's ten C0-C9 (C10 is C0 again: the 11th run looked like
    the first), then tab20's twenty, then as many evenly spaced along turbo."""
    if n <= 10:
        return f"C{i}"
    import matplotlib

    return matplotlib.colormaps["tab20"](i) if n <= 20 else matplotlib.colormaps["turbo"](i / (n - 1))


def _draw_loss(ax, runs: list[RunMetrics], many: bool) -> None:
    for i, run in enumerate(runs):
        colour_ = colour(i, len(runs))
        prefix = f"{run.label} " if many else ""
        if run.train.get("loss"):
            ax.plot(*zip(*run.train["loss"]), color=colour_, label=f"{prefix}train", **_lone(run.train["loss"]))
        if run.val.get("val_loss"):
            ax.plot(*zip(*run.val["val_loss"]), "o--", color=colour_, markersize=3, label=f"{prefix}validation")
        for step in run.rollbacks:
            ax.axvline(step, color=colour_, linestyle=":", alpha=0.6)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")


def panel_names(runs: list[RunMetrics]) -> list[str]:
    """The panels the report draws, in order: loss, learning rate, throughput, then one per
    evaluation metric; a panel no run has data for is left out."""
    names = []
    if any(r.train.get("loss") or r.val.get("val_loss") for r in runs):
        names.append("loss")
    for key in ("lr", "tokens_per_s"):
        if any(r.train.get(key) for r in runs):
            names.append(key)
    names += sorted({name for r in runs for name in r.evals})
    return names


_TITLES = {"lr": "learning rate", "tokens_per_s": "throughput (tokens/s)"}


def draw_report(runs: list[RunMetrics]) -> bytes:
    """All panels in one PNG, two columns, every run overlaid in its own colour."""
    plt = _pyplot()
    names = panel_names(runs)
    if not names:
        raise DataError(f"{runs[0].uri}: no numeric metrics to draw")
    cols = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), dpi=100, squeeze=False)
    many = len(runs) > 1
    for ax, name in zip(axes.flat, names):
        if name == "loss":
            _draw_loss(ax, runs, many)
        else:
            for i, run in enumerate(runs):
                if name in run.evals:
                    steps, values, errs = zip(*run.evals[name])
                    yerr = None if all(e is None for e in errs) else [e or 0.0 for e in errs]
                    ax.errorbar(steps, values, yerr=yerr, fmt="o-", markersize=3, capsize=2,
                                color=colour(i, len(runs)), label=run.label)
                elif run.train.get(name):
                    ax.plot(*zip(*run.train[name]), color=colour(i, len(runs)), label=run.label,
                            **_lone(run.train[name]))
            ax.set_title(_TITLES.get(name, name))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if many or name == "loss":
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    return _png(fig)


def plot_loss_curve(rows: list[dict], uri: str, s3: S3Config | None = None) -> None:
    """A run's own `loss.png`: training and validation loss against step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    _draw_loss(ax, [series("", uri, rows)], many=False)
    ax.set_title("")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    storage.write_bytes(uri, _png(fig), s3)


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_events(run: RunMetrics) -> bytes:
    """The run's rows as one TensorBoard event file: scalar `<kind>/<key>` for every numeric
    field (`<kind>/<task>/<key>` where the row names a task), at the row's step and wall time."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError("raylm report writes TensorBoard files with tensorboardX: "
                          "pip install -e '.[report]' (or pass --no-tensorboard)") from None
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(logdir=tmp, flush_secs=3600)
        for row in run.rows:
            # A row that names a task (one row per task at a step) has its own scalars, as it
            # has its own panels: "eval/acc" held two tasks' values at one step, mixed.
            kind = "/".join(x for x in (row.get("kind") or "metrics", row.get("task")) if x)
            for key, value in row.items():
                if key not in _NOT_METRICS and _number(value):
                    writer.add_scalar(f"{kind}/{key}", float(value), global_step=int(row["step"]),
                                      walltime=row.get("time") if _number(row.get("time")) else None)
        writer.close()
        (name,) = [n for n in os.listdir(tmp) if "tfevents" in n]
        with open(os.path.join(tmp, name), "rb") as f:
            return f.read()


# --------------------------------------------------------------------------- the report


def _check_replaceable(png_uri: str, s3: S3Config | None) -> None:
    """Refuse to replace a `report.png` that raylm report did not draw (PNG_SOFTWARE): a
    report drawn again into its own directory is replaced, a user's file of that name is not."""
    if not storage.exists(png_uri, s3):
        return
    # A directory of that name, or a file that cannot be read, is storage's one-line error.
    if png_software(storage.read_bytes(png_uri, s3)) != PNG_SOFTWARE:
        raise ConfigError(f"{storage.redact_url(png_uri)}: exists and is not a report drawn by raylm report; "
                          f"move it away or pass another --out (nothing was written)")


def _other_event_files(tensorboard: str, files: dict[str, bytes], s3: S3Config | None) -> list[str]:
    """The event files (EVENT_FILE, raylm's own name) under `tensorboard` that `files` does not
    write: an earlier report's, of runs this one leaves out. Other files there are not raylm's."""
    if not storage.exists(tensorboard, s3):
        return []
    new = {storage.relative(uri, tensorboard) for uri in files if uri.endswith("/" + EVENT_FILE)}
    return [f.uri for f in storage.list_files(tensorboard, s3, pattern=False)
            if f.uri.endswith("/" + EVENT_FILE) and storage.relative(f.uri, tensorboard) not in new]


def _refuse_links(out: str, files: dict[str, bytes], given: bool) -> None:
    """Refuse, in one line and before anything is written, a link where a directory the report
    writes into goes below `out` (`tensorboard`, a run's folder there), and `out` itself when
    it is the default `<run>/report`: writing there went into, and removed event files from,
    whatever directory the link named (one planted in a shared run directory). A `--out` given
    as a link is the user's own choice, and followed."""
    if storage.is_s3(out):
        return
    top = os.path.normpath(storage._local(out))
    dirs = {top} if not given else set()
    for uri in files:
        d = os.path.dirname(os.path.normpath(storage._local(uri)))
        while d != top and d.startswith(top + os.sep):
            dirs.add(d)
            d = os.path.dirname(d)
    for d in sorted(dirs):
        if os.path.islink(d):
            raise ConfigError(f"{d}: is a link; raylm report writes only into directories of its own there "
                              f"(remove the link or pass another --out; nothing was written)")


def write_report(runs: list[str], out: str | None = None, s3: S3Config | None = None,
                 tensorboard: bool = True) -> dict:
    """Draw `runs` (local or s3://) into `<out>/report.png` and write one TensorBoard run per
    input under `<out>/tensorboard/<label>/`. `out` defaults to `<run>/report` for one run;
    several runs need it. Every input is read and every file rendered before the first is
    written, and each file is written atomically. A report.png already in `out` is replaced
    only when raylm report drew it (or `out` is the default `<run>/report`, raylm's own);
    otherwise nothing is written (the event files' names, EVENT_FILE, are raylm's own). An
    earlier report's event files of runs this one leaves out (all, without `tensorboard`) are
    removed: `tensorboard --logdir <out>/tensorboard` shows this report's runs only. The
    summary's `skipped` says, per run, what the plot left out or broke its line at (a cut last
    line, null or non-finite values, a step logged twice)."""
    if not runs:
        raise ConfigError("raylm report: give at least one run directory")
    given = out is not None
    if out is None:
        if len(runs) > 1:
            raise ConfigError("raylm report: several runs need --out DIR for the overlaid report")
        out = storage.join(runs[0], "report")
    loaded = load_runs(runs, s3)
    if given:
        _check_replaceable(storage.join(out, "report.png"), s3)
    png = draw_report(loaded)
    files: dict[str, bytes] = {}
    if tensorboard:
        for run in loaded:
            files[storage.join(out, "tensorboard", run.label, EVENT_FILE)] = tensorboard_events(run)
    png_uri = storage.join(out, "report.png")
    files[png_uri] = png  # last: its presence means the report is complete
    _refuse_links(out, files, given)
    # An earlier report's report.png goes first (so a redraw cut short leaves none, not the old
    # one beside new event files), and so do its event files that this report does not replace:
    # runs no longer in it, or all of them without tensorboard (TensorBoard showed them as its own).
    for uri in [png_uri, *_other_event_files(storage.join(out, "tensorboard"), files, s3)]:
        storage.delete(uri, s3)
    for uri, data in files.items():
        storage.write_bytes(uri, data, s3)
    return {"png": png_uri, "panels": panel_names(loaded),
            "tensorboard": storage.join(out, "tensorboard") if tensorboard else None,
            "runs": {run.label: run.uri for run in loaded},
            # What the plot leaves out (a cut last line, null or non-finite values, repeated steps).
            "skipped": {run.label: run.skipped for run in loaded if run.skipped}}
