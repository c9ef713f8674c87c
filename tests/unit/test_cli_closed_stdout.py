"""A reader of raylm's stdout that goes away (`raylm plan ... | head -1`) ends the command
quietly with the shell's 141, as SIGPIPE ends other tools. It printed a BrokenPipeError
traceback and "this is a bug in raylm". A broken pipe that is not stdout's stays a bug."""

from __future__ import annotations

import subprocess
import sys

from raylm.cli import main


def test_a_closed_stdout_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "raylm.cli", "plan", "--size", "tiny", "--gpus", "1xCPU"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before raylm writes its table: the reader has gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err


def test_a_broken_pipe_elsewhere_is_still_a_bug(monkeypatch, capsys):
    def broken(plan):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("raylm.plan.format_table", broken)
    assert main(["plan", "--size", "tiny", "--gpus", "1xCPU"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "BrokenPipeError" in err and "this is a bug in raylm" in err
