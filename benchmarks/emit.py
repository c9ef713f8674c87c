"""Shared tail of the benchmarks: stdout carries exactly one JSON object, optionally also saved."""

import contextlib
import json
import os
import sys


def run_and_emit(main) -> None:
    """Run `main()` with its chatter on stderr, print its result as JSON, and write it to
    result["settings"]["out"] when that is set (e.g. benchmarks/results/<device>-<shape>.json)."""
    with contextlib.redirect_stdout(sys.stderr):
        result = main()
    text = json.dumps(result, indent=2)
    print(text)
    out = result["settings"].get("out")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
