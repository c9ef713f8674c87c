"""From a review of evaluation: two task files of one name, the results files' mode, and a
terminal progress bar wider than the terminal. Each test fails on the code before its fix."""

import io
import json
import os

import pytest

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.progress import Progress

MC = '{"context": "x", "choices": ["a", "b"], "gold": 0}\n'


@pytest.fixture(scope="module")
def tok(tiny_run):
    from raylm.generate import load_for_inference

    return load_for_inference(tiny_run)[1]


def two_files_named_test(tmp_path):
    """tasks/arc/test.jsonl (3 items) and tasks/piqa/test.jsonl (5): both the task `test`."""
    paths = []
    for d, n in (("arc", 3), ("piqa", 5)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test.jsonl").write_text(MC * n)
        paths.append(str(tmp_path / d / "test.jsonl"))
    return paths


def test_in_training_eval_refuses_two_task_files_of_one_name(tmp_path, tok):
    """Its rows are keyed by task name: the second file replaced the first (eval_test_n == 5,
    the arc items never scored), silently."""
    from raylm.eval.in_training import TrainingEval

    arc, piqa = two_files_named_test(tmp_path)
    cfg = load_config(overrides=["eval.every=1", ("eval.mc_tasks", [arc, piqa])])
    with pytest.raises(ConfigError, match=f"^eval.mc_tasks {arc} and eval.mc_tasks {piqa} are both task 'test'"):
        TrainingEval(cfg, tok)
    gen = tmp_path / "test.jsonl"  # a generation task of the same name
    gen.write_text('{"context": "x", "answer": "y"}\n')
    cfg = load_config(overrides=["eval.every=1", ("eval.mc_tasks", [arc]), ("eval.gen_tasks", [str(gen)])])
    with pytest.raises(ConfigError, match="are both task 'test'"):
        TrainingEval(cfg, tok)
    # The same file listed twice is one task, as before.
    cfg = load_config(overrides=["eval.every=1", ("eval.mc_tasks", [arc, arc])])
    assert len(TrainingEval(cfg, tok).mc["test"]) == 3


def test_raylm_eval_refuses_two_task_files_of_one_name(tiny_run, tmp_path, one_thread):
    """results.json had two `test` rows per metric that no reader could tell apart."""
    from raylm.eval.run import evaluate_run

    arc, piqa = two_files_named_test(tmp_path)
    cfg = load_config(overrides=[("eval.mc_tasks", [arc, piqa]), "eval.workers=0"])
    with pytest.raises(ConfigError, match="are both task 'test'"):
        evaluate_run(tiny_run, cfg, out=str(tmp_path / "out"), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_results_files_take_the_umask_mode_and_leave_no_temporary_file(tmp_path):
    """They were written through mkstemp, whose 0600 hid a run's results from its group."""
    from raylm.eval.results import write_results

    old = os.umask(0o022)
    try:
        paths = write_results(str(tmp_path / "out"), [{"task": "t", "metric": "acc", "value": 0.5, "stderr": None,
                                                      "n": 2}], {"checkpoint": "ckpt-1"})
    finally:
        os.umask(old)
    for p in paths.values():
        assert os.stat(p).st_mode & 0o777 == 0o644, oct(os.stat(p).st_mode)
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]["value"] == 0.5


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_bar_is_cut_to_the_terminal_width(monkeypatch):
    """`data: tokenizing`'s bar with its notes runs past 100 characters; on an 80-column
    terminal it wrapped, and "\\r" then redrew only its last row, one stale row per redraw."""
    monkeypatch.setenv("COLUMNS", "60")  # a stand-in terminal has no size of its own: $COLUMNS says
    out = Terminal()
    p = Progress("data: tokenizing", total=28.6e6, unit="MB", scale=1e6, log=lambda s: None, stream=out, every_s=0)
    p.t0 -= 60.0
    p.update(14.3e6, "1,204 docs, 0.53M tokens")
    p.close()
    frames = [f for f in out.getvalue().split("\r\x1b[K") if f]
    assert len(p.line(bar=True)) > 60  # the line itself is wider than the terminal
    assert len(frames) == 1 and len(frames[0]) == 59 and frames[0].startswith("data: tokenizing |####")
    assert frames[0].endswith(" 50% 14.3/28.6 ")  # the bar and its figures come first and stay


def test_a_stream_without_isatty_is_not_a_terminal():
    class Writer:  # a bare writer, as some log wrappers are
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    logged = []
    p = Progress("x", total=0, log=logged.append, stream=Writer(), every_s=0)  # a zero total too
    p.update(3)
    assert not p.tty and len(logged) == 1 and logged[0].startswith("x 3.0")
