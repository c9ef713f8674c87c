"""One process a run: a second raylm process that writes to a run directory in use is refused
at once, before it writes anything there (two runs of one name wrote their checkpoints,
metrics and records over each other's)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from raylm import run_lock
from raylm.config import load_config
from raylm.errors import StorageError


def test_a_held_directory_is_refused_naming_its_holder_and_free_again_after(tmp_path):
    run = str(tmp_path / "run")
    with run_lock.held(run):
        with pytest.raises(StorageError, match=rf"in use by a raylm run, pid {os.getpid()} on .* another name=\)$"):
            with run_lock.held(run):
                pass
    with run_lock.held(run):  # let go at the end of the block
        pass


def test_a_holder_that_is_killed_lets_go(tmp_path):
    """The kernel's lock: a driver killed with SIGKILL cannot clean up, and its restart must
    resume at once, not wait out a lease."""
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from raylm import run_lock
        with run_lock.held({run!r}):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StorageError, match=f"in use by a raylm run, pid {holder.pid} "):
            with run_lock.held(run):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock.held(run):
        pass


def _cfg(tmp_path, *overrides):
    return load_config(overrides=[f"storage={tmp_path}", "name=run", *overrides])


def test_pretrain_refuses_a_run_in_use_before_writing_there(tmp_path):
    from raylm.pipeline import pretrain

    run = tmp_path / "run"
    with run_lock.held(str(run)):
        with pytest.raises(StorageError, match="in use by a raylm run"):
            pretrain(_cfg(tmp_path))
        assert os.listdir(run) == [run_lock.RUN_LOCK]


def test_posttrain_refuses_a_run_in_use_before_writing_there(tmp_path, tiny_run):
    from raylm.posttrain import posttrain

    run = tmp_path / "run"
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with run_lock.held(str(run)):
        with pytest.raises(StorageError, match="in use by a raylm run"):
            posttrain(_cfg(tmp_path, "stage=sft", f"init_from={tiny_run}", f"data.path={tmp_path / 'chat.jsonl'}"))
        assert os.listdir(run) == [run_lock.RUN_LOCK]


def test_a_resume_with_nothing_to_resume_leaves_no_directory(tmp_path):
    """`--resume` of a mistyped name is refused before the lock makes the run directory."""
    from raylm.errors import PathNotFoundError
    from raylm.pipeline import pretrain

    with pytest.raises(PathNotFoundError, match="no complete checkpoint"):
        pretrain(_cfg(tmp_path), resume="must")
    assert not (tmp_path / "run").exists()


def test_tune_refuses_a_search_in_use_new_or_resumed(tmp_path):
    from raylm import tune

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: loguniform(1e-4, 1e-3)\n")
    run = tmp_path / "run"
    with run_lock.held(str(run)):  # a run of the same name
        with pytest.raises(StorageError, match="in use by a raylm run, pid .* this search another name"):
            tune.tune(_cfg(tmp_path), str(space))
        (run / tune.SEARCH_FILE).write_text("{}")
        with pytest.raises(StorageError, match="in use by a raylm run"):
            tune.resume(_cfg(tmp_path))
