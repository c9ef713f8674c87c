"""An evaluation's record: results.json (one row per task and metric) and results.md (a table).

Each row: task, metric, value, stderr, n, checkpoint, checkpoint_sha256, tokenizer_sha256,
harness (lm-eval's version for harness tasks, "raylm" for the built-in scorers and bits per
byte), and for a harness task num_fewshot (the examples before each item it was scored
with). Both files are written under temporary names, flushed to disk and renamed (or, in
object storage, written as whole objects), markdown last, so a reader never finds a partial
result that looks complete; the old results.md goes before the new results.json is written,
so a cut between the two leaves no table of other results beside it.

`checkpoint_sha256` is the sha256 of the checkpoint's COMMITTED marker, which lists every
file's size and sha256: it names the weights scored. A checkpoint written again at the same
step (a run directory reused after its checkpoints were removed) has the same path and step
but another marker, and `forget_other_results` removes results of its old weights when the
checkpoint is evaluated again, before the evaluation starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

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


def limit_note(limit: int) -> str:
    """What a score under `--limit` is: never to be read as the full one."""
    return f"--limit {limit}: the first {limit} items of each task and documents of each corpus only, not the full score"


def write_results(out: str, rows: list[dict], header: dict, s3=None) -> dict:
    """Write results.json and results.md into `out` (local or s3://); returns their paths."""
    doc = json.dumps(finite({**header, "results": rows}), indent=1, allow_nan=False)
    md = (f"Evaluation of `{header.get('checkpoint', '?')}` (tokenizer {str(header.get('tokenizer_sha256', ''))[:12]}, "
          f"lm-eval {header.get('lm_eval_version') or 'not used'}"
          + (f"; {limit_note(header['limit'])}" if header.get("limit") else "")
          + (f"; --num-fewshot {header['num_fewshot']}" if header.get("num_fewshot") is not None else "")
          + (f"; generation tasks sampled at eval.temperature={header['gen_temperature']:g}, seed "
             f"{header.get('seed')}" if header.get("gen_temperature") else "")
          + ")\n\n" + markdown_table(rows))
    paths = {"json": storage.join(out, "results.json"), "markdown": storage.join(out, "results.md")}
    # storage.write_text: a whole object on S3; locally a temporary file flushed to disk, then
    # renamed, with the umask's mode (mkstemp's 0600 left the results unreadable to the group).
    # An earlier table goes first: cut after the new results.json, it would sit beside it.
    storage.delete(paths["markdown"], s3)
    storage.write_text(paths["json"], doc, s3)
    storage.write_text(paths["markdown"], md, s3)
    return paths


def checkpoint_sha256(ckpt: str, s3=None) -> str:
    """The sha256 of checkpoint `ckpt`'s COMMITTED marker (as a recipe records a model stage's
    checkpoint): the marker lists the size and sha256 of every file, so it names the weights."""
    from raylm.checkpoint import COMMIT_MARKER

    return hashlib.sha256(storage.read_bytes(storage.join(ckpt, COMMIT_MARKER), s3)).hexdigest()


def _same_place(recorded, ckpt: str) -> bool:
    """Whether a results file's `checkpoint` is the checkpoint directory `ckpt` (a local one
    named by a relative or an absolute path, or with a trailing slash, too)."""
    if not isinstance(recorded, str) or not recorded:
        return False
    if storage.is_s3(recorded) or storage.is_s3(ckpt):
        return recorded.rstrip("/") == ckpt.rstrip("/")
    if not os.path.isabs(recorded):
        # Written before raylm recorded absolute paths: relative to a directory not recorded,
        # so the checkpoint is taken to be one whose path ends so.
        tail = os.path.normpath(recorded)
        return tail != "." and (os.path.realpath(ckpt) + os.sep).endswith(os.sep + tail + os.sep)
    return os.path.realpath(recorded) == os.path.realpath(ckpt)


def forget_other_results(out: str, ckpt: str, ckpt_sha256: str, s3=None) -> bool:
    """Remove results.json and results.md from `out` where they score checkpoint `ckpt` but
    not the weights it holds now (another `checkpoint_sha256`, or none recorded: written
    before raylm recorded it); returns whether it did. Results of the same weights, or of
    another checkpoint, stay until the new ones replace them."""
    json_uri, md_uri = storage.join(out, "results.json"), storage.join(out, "results.md")
    if not storage.exists(json_uri, s3):
        return False
    try:
        doc = json.loads(storage.read_bytes(json_uri, s3))
    except ValueError:  # damaged, or not UTF-8: not this checkpoint's results either way
        doc = None
    if not isinstance(doc, dict) or not _same_place(doc.get("checkpoint"), ckpt) \
            or doc.get("checkpoint_sha256") == ckpt_sha256:
        return False
    storage.delete(md_uri, s3)
    storage.delete(json_uri, s3)
    return True


def earlier_tasks(out: str, s3=None) -> list[str]:
    """The tasks of the results.json in `out` (an earlier evaluation's, which the next one
    replaces), in order; none when there is no readable one."""
    uri = storage.join(out, "results.json")
    if not storage.exists(uri, s3):
        return []
    try:
        doc = json.loads(storage.read_bytes(uri, s3))
    except ValueError:
        return []
    rows = doc.get("results") if isinstance(doc, dict) else None
    tasks = [r.get("task") for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    return list(dict.fromkeys(t for t in tasks if isinstance(t, str)))
