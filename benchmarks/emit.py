"""Shared tail of the benchmarks: stdout carries exactly one JSON object, optionally also saved."""

import contextlib
import json
import os
import sys

from raylm.eval.results import finite  # non-finite figures as null: JSON has no NaN


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, renamed over it:
    a reader (or a later run) sees the previous file or the whole new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run_and_emit(main) -> None:
    """Run `main()` with its chatter on stderr, print its result as JSON, and write it to
    result["settings"]["out"] when that is set (e.g. benchmarks/results/<device>-<shape>.json).
    Non-finite numbers are written as null."""
    with contextlib.redirect_stdout(sys.stderr):
        result = main()
    text = json.dumps(finite(result), indent=2, allow_nan=False)
    print(text)
    out = result["settings"].get("out")
    if out:
        write_atomic(out, text + "\n")
