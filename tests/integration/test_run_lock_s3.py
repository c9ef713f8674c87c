"""One process a run on object storage: the run lock is a lease in S3 (SeaweedFS here), taken
with a conditional PUT, renewed by its holder, refused to a second process while renewed,
and taken over when its holder is gone."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from botocore.exceptions import ClientError

from raylm import run_lock, storage
from raylm.config import load_config
from raylm.errors import StorageError


@pytest.fixture
def short_lease(monkeypatch):
    monkeypatch.setattr(run_lock, "LEASE_S", 1.0)  # renewed every 0.25 s


@pytest.fixture(autouse=True)
def python_sigint():
    """Python's own Ctrl-C handler while a lease interrupts the main thread: tests that run Ray's
    plain TorchTrainer in this process (test_eval_ray, test_fsdp_parity) leave Ray Train's
    handler behind, which counts the interrupts and exits the process at the third."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _lease(s3_server, run: str) -> dict | None:
    bucket, key = storage._split_s3(storage.join(run, run_lock.RUN_LOCK))
    try:
        return json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3_server.client().exceptions.NoSuchKey:
        return None


def _holder(run: str, lease_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from raylm import run_lock
        with run_lock.held({run!r}):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAYLM_S3_LEASE_S": str(lease_s)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_leased_run_is_refused_in_the_same_process_and_free_after(s3_server, s3_prefix, short_lease):
    run = f"{s3_prefix}/run"
    with run_lock.held(run):
        assert _lease(s3_server, run)["pid"] == os.getpid()
        with pytest.raises(StorageError, match=rf"in use by a raylm run, pid {os.getpid()} on .* another name=\)$"):
            with run_lock.held(run):
                pass
    assert _lease(s3_server, run) is None  # let go at the end of the block
    with run_lock.held(run):
        pass


def test_a_live_holder_in_another_process_is_refused(s3_server, s3_prefix, capsys):
    """Another process renews its lease while a newcomer watches it: refused, naming it."""
    run = f"{s3_prefix}/run"
    holder = _holder(run, lease_s=2.0)
    try:
        with pytest.raises(StorageError, match=f"in use by a raylm run, pid {holder.pid} "):
            with run_lock.held(run):
                pass
        assert "watching the lease" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(s3_server, s3_prefix, capsys):
    """A driver killed with SIGKILL cannot let go; its restart on the same machine must not
    wait out the lease (600 s here)."""
    run = f"{s3_prefix}/run"
    holder = _holder(run, lease_s=600.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock.held(run):
        assert _lease(s3_server, run)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"pid {holder.pid} on" in err and "is gone" in err and "watching" not in err


def test_a_lease_left_unrenewed_by_another_machine_is_taken_over_after_its_term(s3_server, s3_prefix, capsys):
    run = f"{s3_prefix}/run"
    bucket, key = storage._split_s3(storage.join(run, run_lock.RUN_LOCK))
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=json.dumps({
        "holder": "a raylm run, pid 7 on elsewhere", "machine": "elsewhere", "pid": 7, "lease_s": 1.0}).encode())
    with run_lock.held(run):
        assert _lease(s3_server, run)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "watching the lease for up to 1 s" in err
    assert "took over" in err and "pid 7 on elsewhere, left it without renewing for its 1 s term" in err


def test_a_holder_whose_lease_was_taken_says_so_at_the_end(s3_server, s3_prefix, short_lease):
    run = f"{s3_prefix}/run"
    bucket, key = storage._split_s3(storage.join(run, run_lock.RUN_LOCK))
    with pytest.raises(StorageError, match="was taken over by another process"):
        with run_lock.held(run) as lease:
            s3_server.client().put_object(Bucket=bucket, Key=key, Body=b'{"holder": "a usurper"}')
            lease.thread.join(timeout=30)  # its next renewal finds the lease changed, and stops
            assert lease.lost
    assert _lease(s3_server, run) == {"holder": "a usurper"}  # not deleted: it is not this process's


def test_pretrain_refuses_a_leased_run_before_writing_there(s3_server, s3_prefix, short_lease):
    from raylm.pipeline import pretrain

    cfg = load_config(overrides=[f"storage={s3_prefix}", "name=run"])
    with run_lock.held(cfg.run_dir):
        with pytest.raises(StorageError, match="in use by a raylm run"):
            pretrain(cfg)
        names = [f.uri for f in storage.list_files(cfg.run_dir)]
    assert [storage.relative(n, cfg.run_dir) for n in names] == [run_lock.RUN_LOCK]


def test_an_endpoint_that_ignores_conditional_writes_is_said_and_the_run_goes_on(s3_server, s3_prefix, short_lease, capsys):
    """Some S3-compatible servers ignore If-None-Match/If-Match: a lease there locks nothing,
    which is said in one line instead of being trusted. The headers are stripped from the real
    requests here, as such a server would ignore them."""
    run = f"{s3_prefix}/run"
    client = storage.boto3_client(None)

    def strip(request, **_):
        for name in ("If-None-Match", "If-Match"):
            if name in request.headers:
                del request.headers[name]

    client.meta.events.register("before-sign.s3.PutObject", strip)
    try:
        with run_lock.held(run) as lease:
            assert lease.thread is None  # nothing renewed
        assert "ignores conditional writes (If-None-Match), so" in capsys.readouterr().err
        assert _lease(s3_server, run) is None  # deleted at the end all the same
    finally:
        client.meta.events.unregister("before-sign.s3.PutObject", strip)


@pytest.mark.parametrize("answer", ["412", "aws-404"])
def test_a_holder_whose_lease_was_deleted_stops_and_says_so(s3_server, s3_prefix, short_lease, answer):
    """A lease deleted under its holder (by hand, or by a newcomer that took it over and then
    let go) is lost: the holder must not renew on as if nothing happened. SeaweedFS answers the
    renewal's If-Match with 412; AWS documents 404 NoSuchKey for If-Match on a missing key,
    which the hook below gives where the real server holds no lease."""
    run = f"{s3_prefix}/run"
    bucket, key = storage._split_s3(storage.join(run, run_lock.RUN_LOCK))
    client = storage.boto3_client(None)  # the lease's own client (cached)
    other = s3_server.client()

    def aws(params, **_):
        if "If-Match" in params["headers"]:
            try:
                other.head_object(Bucket=bucket, Key=key)
            except other.exceptions.ClientError:
                raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "The specified key does not exist."},
                                   "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject") from None

    if answer == "aws-404":
        client.meta.events.register("before-call.s3.PutObject", aws)
    try:
        with pytest.raises(StorageError, match="was deleted by another process"):
            with run_lock.held(run) as lease:
                other.delete_object(Bucket=bucket, Key=key)
                lease.thread.join(timeout=30)  # its next renewal finds the lease gone, and stops
                assert lease.lost
    finally:
        client.meta.events.unregister("before-call.s3.PutObject", aws)
    assert _lease(s3_server, run) is None
