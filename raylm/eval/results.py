"""An evaluation's record: results.json (one row per task and metric) and results.md (a table).

Each row: task, metric, value, stderr, n, checkpoint, tokenizer_sha256, harness (lm-eval's
version for harness tasks, "raylm" for the built-in scorers and bits per byte). Both files
are written under temporary names, flushed to disk and renamed (or, in object storage,
written as whole objects), markdown last, so a reader never finds a partial result that
looks complete.
"""

from __future__ import annotations

import json
import math

from raylm import storage


def rows_from_metrics(task: str, metrics: dict, facts: dict, harness: str = "raylm") -> list[dict]:
    """One row per metric of a `{metric: value, metric_stderr: value, n: count}` dict."""
    n = metrics.get("n")
    rows = []
    for key, value in metrics.items():
        if key == "n" or key.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        rows.append({"task": task, "metric": key, "value": value, "stderr": metrics.get(f"{key}_stderr"), "n": n,
                     **facts, "harness": harness})
    return rows


def _cell(v) -> str:
    """A table cell: a '|' in a task or metric name (`corpus:a|b.txt`, a harness group) would
    start a new column, and a line break would end the row, so both are escaped."""
    text = "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | metric | value | ± stderr | n |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(r[k]) for k in ("task", "metric", "value", "stderr", "n")) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def finite(x):
    """`x` with NaN and infinities as None: JSON has no such numbers (Python writes NaN and
    Infinity, which strict readers such as jq and JavaScript refuse)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_results(out: str, rows: list[dict], header: dict, s3=None) -> dict:
    """Write results.json and results.md into `out` (local or s3://); returns their paths."""
    doc = json.dumps(finite({**header, "results": rows}), indent=1, allow_nan=False)
    md = (f"Evaluation of `{header.get('checkpoint', '?')}` (tokenizer {str(header.get('tokenizer_sha256', ''))[:12]}, "
          f"lm-eval {header.get('lm_eval_version') or 'not used'})\n\n" + markdown_table(rows))
    paths = {"json": storage.join(out, "results.json"), "markdown": storage.join(out, "results.md")}
    # storage.write_text: a whole object on S3; locally a temporary file flushed to disk, then
    # renamed, with the umask's mode (mkstemp's 0600 left the results unreadable to the group).
    storage.write_text(paths["json"], doc, s3)
    storage.write_text(paths["markdown"], md, s3)
    return paths
