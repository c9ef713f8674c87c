"""The engine's own process (raylm/serve/engine_process.py): what it imports, and that it does
not outlive a replica that died while it loaded. No Ray: the bridge is driven directly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raylm.serve.engine_process import EngineProcess


def test_a_module_in_the_replicas_working_directory_does_not_run_in_the_engine_process(tiny_run, tmp_path,
                                                                                      monkeypatch):
    """The engine process was started with `python -m`, which puts the current directory first
    on its import path: a torch.py (or a raylm/ of another version) in the directory the replica
    ran in was imported by the engine process instead of the replica's own, although the
    replica itself never looked there. In a directory others can write to, that ran their code
    as the user serving."""
    marker = tmp_path / "planted-ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "torch.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(42)\n")
    monkeypatch.chdir(shared)
    ep = EngineProcess(tiny_run, threads=1, max_batch_size=1)
    try:
        assert not marker.exists()
        assert ep.alive()
    finally:
        ep._conn.close()  # as the replica's exit does
        ep._proc.wait(timeout=60)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_the_engine_process_ends_when_the_replica_dies_while_it_loads(tmp_path, monkeypatch):
    """The engine process read its socket only once its model was loaded: a replica killed
    mid-load (Serve giving up on it, a shutdown) left it loading on, holding the memory the
    replacement replica needs, for as long as the load took, forever if it hung on storage."""
    hook = tmp_path / "hook"
    hook.mkdir()
    started = tmp_path / "engine-pid"
    # In the engine process only (the variable below), the load hangs, as one stuck on storage.
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os
        if os.environ.get("RAYLM_TEST_HANGING_LOAD"):
            import time
            from raylm.serve import engine

            def from_run(cls, uri, *args, **kw):
                with open({str(started)!r}, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)

            engine.Engine.from_run = classmethod(from_run)
    """))
    monkeypatch.setenv("RAYLM_TEST_HANGING_LOAD", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *(p for p in sys.path if p)]))
    replica = subprocess.Popen([sys.executable, "-c", "import sys\n"
                                "from raylm.serve.engine_process import EngineProcess\n"
                                "EngineProcess(sys.argv[1], threads=1)\n", str(tmp_path / "run")])
    engine_pid = None
    try:
        deadline = time.monotonic() + 120
        while not (started.exists() and started.read_text()):
            assert replica.poll() is None and time.monotonic() < deadline, "the engine process never began its load"
            time.sleep(0.05)
        engine_pid = int(started.read_text())
        os.kill(replica.pid, signal.SIGKILL)
        replica.wait()
        deadline = time.monotonic() + 60
        while not _gone(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(engine_pid), "the engine process went on loading for a replica that is gone"
    finally:
        if replica.poll() is None:
            replica.kill()
            replica.wait()
        if engine_pid is not None and not _gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)
