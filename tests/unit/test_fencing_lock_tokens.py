"""Fencing on a local run directory: each hold of a run writes a fresh token into its lock file,
and a writer given a hold's token (a driver's Ray Train workers, which outlive its hold by a
second or two after a SIGKILL) commits no checkpoint and writes no metrics once the lock
carries another process's token. Real processes hold the lock; real checkpoints are saved."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from raylm import checkpoint, run_lock
from raylm.config import ModelConfig, TrainConfig, load_config
from raylm.model import build_model
from raylm.run_lock import RunTaken
from raylm.train import CheckpointSaver, FencedMetricsLog, Hooks, make_optimizer, storage_publisher

TAKEN = r"\.raylm\.lock: another process holds this run now .* stops here without writing to the run$"


def _holder(run: str) -> tuple[subprocess.Popen, dict]:
    """Another process holding `run`, and the fence it would hand its workers."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, time
        from raylm import run_lock
        with run_lock.held({run!r}):
            print(json.dumps(run_lock.fence_for({run!r})), flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return proc, json.loads(proc.stdout.readline())


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_holds_token_passes_while_it_holds_and_fails_once_another_holds(tmp_path):
    run = str(tmp_path / "run")
    with run_lock.held(run):
        mine = run_lock.fence_for(run)
        assert mine and len(mine["token"]) == 32
        run_lock.check_fence(mine)
    assert run_lock.fence_for(run) is None
    with pytest.raises(RunTaken, match=r"\.raylm\.lock: gone "):  # let go: the lock file it made is gone
        run_lock.check_fence(mine)
    proc, theirs = _holder(run)
    try:
        assert theirs["token"] != mine["token"]
        run_lock.check_fence(theirs)  # checked from another process, as a worker checks
        with pytest.raises(RunTaken, match=TAKEN):
            run_lock.check_fence(mine)
    finally:
        _stop(proc)
    # A killed holder's token stays in the file until the next hold writes its own: its
    # workers go on only while no other process holds the run.
    run_lock.check_fence(theirs)
    with run_lock.held(run):
        with pytest.raises(RunTaken, match=TAKEN):
            run_lock.check_fence(theirs)
    run_lock.check_fence(None)  # no lock (a filesystem without flock): nothing to check


def test_the_token_stays_out_of_the_refusal(tmp_path):
    run = str(tmp_path / "run")
    proc, _ = _holder(run)
    try:
        with pytest.raises(Exception, match=rf"in use by a raylm run, pid {proc.pid} on \S+ \(wait for it"):
            with run_lock.held(run):
                pass
    finally:
        _stop(proc)


def _saver(tmp_path, fence):
    cfg = load_config(overrides=[
        f"storage={tmp_path}", "name=run", "model.vocab_size=64", "model.dim=32", "model.n_layers=1",
        "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.async_checkpoint=false"])
    model = build_model(cfg.model, seed=1)
    hooks = Hooks(report=lambda m: None, publish_checkpoint=storage_publisher(cfg), val_batches=lambda: [],
                  checkpoint_meta={}, fence=lambda: run_lock.check_fence(fence))
    return cfg, model, make_optimizer(model, cfg.train, torch.device("cpu")), CheckpointSaver(cfg, hooks)


def test_a_writer_whose_driver_lost_the_run_commits_nothing_and_logs_nothing(tmp_path):
    run = str(tmp_path / "run")
    with run_lock.held(run):
        mine = run_lock.fence_for(run)
        cfg, model, opt, saver = _saver(tmp_path, mine)
        saver.save(model, opt, 2, 8, {})  # while held: committed as before
        log = FencedMetricsLog(run, None, saver.hooks.fence)
        log.log({"kind": "train", "step": 2})
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(run)] == [(2, True)]
    rows = open(os.path.join(run, "metrics.jsonl")).read()
    proc, _ = _holder(run)  # the driver restarted: it holds the run now
    try:
        with pytest.raises(RunTaken, match=TAKEN):
            saver.save(model, opt, 4, 16, {})
        with pytest.raises(RunTaken, match=TAKEN):
            log.log({"kind": "train", "step": 4})
        with pytest.raises(RunTaken, match=TAKEN):
            log.flush()
    finally:
        _stop(proc)
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(run)] == [(2, True), (4, False)]
    assert open(os.path.join(run, "metrics.jsonl")).read() == rows


def test_the_commit_checks_right_before_its_marker(tmp_path):
    run = str(tmp_path / "run")
    with run_lock.held(run):
        stale = run_lock.fence_for(run)
    proc, _ = _holder(run)
    try:
        model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16), seed=1)
        opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        uri = os.path.join(run, checkpoint.checkpoint_name(1))
        checkpoint.write_local(model, opt, {"step": 1}, uri)
        with pytest.raises(RunTaken, match=TAKEN):
            checkpoint.commit(uri, {"step": 1}, files=checkpoint.file_digests(uri),
                              fence=lambda: run_lock.check_fence(stale))
    finally:
        _stop(proc)
    assert not os.path.exists(os.path.join(uri, checkpoint.COMMIT_MARKER))


def test_a_lock_that_is_gone_is_named_so(tmp_path):
    """A lock file no longer there (its holder let go, or a node that does not see the run
    directory the driver holds: local storage on several nodes without a shared filesystem)
    stops the writer too, saying which."""
    run = str(tmp_path / "run")
    with run_lock.held(run):
        fence = run_lock.fence_for(run)
        run_lock.check_fence(fence)
        os.unlink(os.path.join(run, run_lock.RUN_LOCK))
        with pytest.raises(RunTaken, match=r"\.raylm\.lock: gone \(its holder let go, or this node does not see"):
            run_lock.check_fence(fence)
