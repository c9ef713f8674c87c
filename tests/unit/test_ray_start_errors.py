"""Ray's cluster not coming up is the machine's or the cluster's problem, not raylm's: one line
naming what failed and what to try, never a traceback that calls it a bug in raylm. Anything
else ray.init raises is still a bug, with its traceback.

ray.init raises here what Ray 2.60 raises (ray/_private/node.py, Node.__init__) when the raylet
has not registered with the GCS within 30 s, as on an overloaded machine; no cluster starts."""

from __future__ import annotations

import pytest
import ray

from raylm import cli
from raylm.config import Config
from raylm.errors import UserError
from raylm.pipeline import init_ray
from raylm.tokenizer import train_tokenizer

TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed "
             "to startup or the GCS has become overloaded.")


def failing_init(monkeypatch, error: BaseException) -> None:
    def init(*args, **kwargs):
        raise error

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever cluster an earlier test left
    monkeypatch.delenv("RAYLM_LOCAL_CLUSTER", raising=False)  # init_ray sets it for this process: put back after
    monkeypatch.setattr(ray, "init", init)


def prepare_args(tmp_path) -> list[str]:
    """`raylm data prepare` of a small corpus on Ray Data (data.in_process_mb=0): it starts Ray."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of some text about rivers, stones and light\n\n" for i in range(300)))
    tok = train_tokenizer([corpus.read_text()], str(tmp_path / "tok"), 300)
    return ["data", "prepare", "--data", str(corpus), "--tokenizer", tok.path, "--out", str(tmp_path / "out"),
            "data.in_process_mb=0"]


def test_a_local_cluster_that_times_out_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = prepare_args(tmp_path)
    failing_init(monkeypatch, Exception(TIMED_OUT))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "bug" not in err, err
    assert err.startswith("raylm: error: Ray's local cluster did not start: The current node timed out during startup")
    assert "RAY_ADDRESS" in err and "session_latest/logs" in err


def test_a_cluster_that_cannot_be_joined_names_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    failing_init(monkeypatch, ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6379"))
    with pytest.raises(UserError, match=r"RAY_ADDRESS=10\.0\.0\.9:6379: Failed to connect .*unset RAY_ADDRESS"):
        init_ray(Config())


def test_other_errors_of_ray_init_stay_bugs(tmp_path, monkeypatch, capsys):
    """An argument Ray does not take is raylm's mistake: its traceback and the bug line stay."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = prepare_args(tmp_path)
    failing_init(monkeypatch, RuntimeError("Unknown keyword argument(s): dashboard_hots"))
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "Unknown keyword argument(s)" in err and "this is a bug in raylm" in err
