"""Errors that help without hiding bugs: raylm's own error types print as one line (exit 2);
anything else, a ValueError from inside raylm included, keeps its traceback and asks for a bug
report (exit 1); `--debug` shows the traceback of the one-line errors too. In process, through
`raylm.cli.main`, on the `generate` subcommand, whose loader is swapped for one that raises."""

from __future__ import annotations

import logging
import pickle

import pytest

import raylm.generate
from raylm import cli
from raylm.checkpoint import CheckpointError
from raylm.config import ConfigError, load_config
from raylm.data import DataError
from raylm.errors import PathNotFoundError, TrainingStopped, TrainingTimeout, UserError
from raylm.storage import StorageError


def _run(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _loader_raising(monkeypatch, error: BaseException):
    def load_for_inference(*args, **kwargs):
        raise error

    monkeypatch.setattr(raylm.generate, "load_for_inference", load_for_inference)


@pytest.mark.parametrize("error", [ValueError("shapes (3,) and (4,) differ"), KeyError("layers.0.wq"),
                                   OSError(5, "Input/output error"), FileNotFoundError("/nowhere/x.bin")])
def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys, error):
    """Plain library errors, ValueError and OSError included, are not raylm's user errors:
    printing them as one line would pass a bug off as the user's mistake."""
    _loader_raising(monkeypatch, error)
    code, err = _run(["generate", "run-dir"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and type(error).__name__ in err
    assert "raylm: error:" not in err
    assert err.strip().splitlines()[-1].startswith("raylm: this is a bug in raylm; please report")


@pytest.mark.parametrize("error", [ConfigError("model.dim=7 is not divisible by model.n_heads=4"),
                                   CheckpointError("runs/x/ckpt-1: incomplete"),
                                   StorageError("s3://b/k", "access denied (check the keys)"),
                                   PathNotFoundError("runs/x: no complete checkpoint")])
def test_a_user_error_is_one_line(monkeypatch, capsys, error):
    _loader_raising(monkeypatch, error)
    code, err = _run(["generate", "run-dir"], capsys)
    assert code == 2
    assert err == f"raylm: error: {error}\n"


def test_a_real_config_error_is_one_line(capsys):
    code, err = _run(["generate", "run-dir", "--top-k", "-3"], capsys)
    assert code == 2 and err.startswith("raylm: error: ") and err.count("\n") == 1 and "top_k" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_user_error(monkeypatch, capsys, where):
    _loader_raising(monkeypatch, ConfigError("tokenizer.path=x: not found"))
    argv = ["--debug", "generate", "run-dir"] if where == "before" else ["generate", "run-dir", "--debug"]
    code, err = _run(argv, capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "load_for_inference" in err
    assert err.strip().splitlines()[-1] == "raylm: error: tokenizer.path=x: not found"


def test_user_error_wrapped_by_ray_is_still_one_line(monkeypatch, capsys):
    """Ray wraps a worker's exception (RayTaskError with `cause`); the CLI unwraps Ray's wrappers."""
    from ray.exceptions import RayTaskError

    cause = DataError("corpus/a.jsonl line 3: not JSON")
    wrapped = RayTaskError("read", "Traceback ...", cause).as_instanceof_cause()
    _loader_raising(monkeypatch, wrapped)
    code, err = _run(["generate", "run-dir"], capsys)
    assert code == 2 and err == "raylm: error: corpus/a.jsonl line 3: not JSON\n"


@pytest.mark.parametrize("cls,base", [(ConfigError, ValueError), (DataError, ValueError),
                                      (CheckpointError, ValueError), (StorageError, OSError),
                                      (PathNotFoundError, FileNotFoundError),
                                      (TrainingStopped, FloatingPointError), (TrainingTimeout, TimeoutError)])
def test_error_types_keep_their_old_bases_and_survive_pickling(cls, base):
    """Callers that catch ValueError/OSError keep working, and Ray (which pickles a worker's
    exception to the driver) delivers the same type and message."""
    e = cls("s3://b/k", "gone") if cls is StorageError else cls("the message")
    assert isinstance(e, UserError) and isinstance(e, base)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e)


def test_config_errors_from_the_library_are_raylms_own():
    with pytest.raises(ConfigError):
        load_config(None, ["train.lr=-1"])


def test_rays_log_of_a_user_error_is_dropped_and_a_bugs_kept():
    """pipeline._QuietUserErrors (Ray's console handlers) keys off the same USER_ERRORS."""
    from raylm.pipeline import _QuietUserErrors

    def record(e):
        return logging.LogRecord("ray", logging.ERROR, __file__, 1, "task failed", None, (type(e), e, None))

    f = _QuietUserErrors()
    assert not f.filter(record(DataError("bad line")))
    assert f.filter(record(ValueError("a bug")))
