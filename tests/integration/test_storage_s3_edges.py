"""raylm.storage against the session's S3 server: downloads of a single object, paths listed
as names rather than patterns, and keys that need escaping in requests; and the run lease
(raylm.run_lock) where its renewals fail or it is taken from a live holder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from raylm import run_lock, storage
from raylm.config import S3Config
from raylm.storage import StorageError, join
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("s3_server")]


def rel(prefix: str, infos) -> list[str]:
    return [i.uri[len(prefix) + 1 :] for i in infos]


def test_download_of_an_object_says_it_is_a_file(s3_prefix, tmp_path):
    """`tokenizer.path=s3://.../tokenizer.model` (the file, not its directory) failed with
    "<uri>: is a directory, not a file"."""
    uri = join(s3_prefix, "tok", "tokenizer.model")
    storage.write_bytes(uri, b"x")
    with pytest.raises(StorageError) as e:
        storage.download_dir(uri, str(tmp_path / "d"))
    assert str(e.value) == f"{uri}: is a file, not a directory (name the directory holding it)"
    storage.download_dir(join(s3_prefix, "tok"), str(tmp_path / "d"))
    assert (tmp_path / "d" / "tokenizer.model").read_bytes() == b"x"


def test_a_prefix_with_wildcards_lists_literally_when_asked(s3_prefix):
    """`export --out s3://.../exp*` checked the pattern's matches for an earlier export, not the
    prefix it then wrote to: a complete export there was written over."""
    for name in ("exp*/raylm_export.json", "exp*/model.safetensors", "expert", "exp?/x", "exp*x/y"):
        storage.write_bytes(join(s3_prefix, name), b"1")
    out = join(s3_prefix, "exp*")
    assert rel(s3_prefix, storage.list_files(out, pattern=False)) == [
        "exp*/model.safetensors", "exp*/raylm_export.json"]
    assert rel(s3_prefix, storage.list_files(out)) == ["expert"]  # the default: a pattern


def test_keys_that_need_escaping_round_trip(s3_prefix, tmp_path):
    names = ["sp ace.txt", "pct%20x", "plus+x", "uni-é中", "amp&eq=;", "d/a b/c+d%e"]
    for name in names:
        storage.write_bytes(join(s3_prefix, "src", name), name.encode())
    assert rel(join(s3_prefix, "src"), storage.list_files(join(s3_prefix, "src"))) == sorted(names)
    storage.download_dir(join(s3_prefix, "src"), str(tmp_path / "d"))
    storage.upload_dir(str(tmp_path / "d"), join(s3_prefix, "dst"))
    for name in names:
        assert storage.read_bytes(join(s3_prefix, "dst", name)) == name.encode()
    storage.delete(join(s3_prefix, "src", "d", "a b"))  # a prefix with a space, not its neighbours
    assert rel(join(s3_prefix, "src"), storage.list_files(join(s3_prefix, "src"))) == sorted(names[:-1])


def test_more_keys_than_one_listing_page(s3_prefix, tmp_path):
    """S3 lists at most 1000 keys a request: listing, download and delete follow the pages, and
    a prefix's delete keeps its neighbour sharing the name prefix."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"many/{i:04d}" for i in range(1003)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: storage.write_bytes(join(s3_prefix, n), b"1"), names + ["manyx/1"]))
    assert rel(s3_prefix, storage.list_files(join(s3_prefix, "many"))) == names
    assert len(storage.list_files(join(s3_prefix, "many", "*"))) == 1003
    storage.download_dir(join(s3_prefix, "many"), str(tmp_path / "d"))
    assert len(list((tmp_path / "d").iterdir())) == 1003
    storage.delete(join(s3_prefix, "many") + "/")
    assert rel(s3_prefix, storage.list_files(s3_prefix)) == ["manyx/1"]


def test_a_bucket_name_the_server_refuses_is_named(tmp_path):
    """The server's InvalidBucketName came back through pyarrow as its whole error text, with
    the request id."""
    (tmp_path / "f").write_text("f")
    uri = "s3://Bad_Bucket!/x"
    with pytest.raises(StorageError) as e:
        storage.upload_dir(str(tmp_path), uri)
    assert str(e.value) == f"{uri}: {storage._BAD_BUCKET}"


def test_a_failed_lease_renewal_never_logs_the_endpoints_password(s3_server, s3_prefix, monkeypatch, capsys):
    """botocore's message quotes the endpoint URL as given: `could not renew the lease ...:
    Connection was closed ... "http://user:secret@host/..."` reached stderr (and job logs)."""
    monkeypatch.setattr(run_lock, "LEASE_S", 1.0)  # renewed every 0.25 s
    run = join(s3_prefix, "run")
    with TcpProxy(s3_server.endpoint) as proxy:
        s3 = S3Config(endpoint_url=proxy.url.replace("://", "://user:secret@"), max_attempts=1)
        with run_lock.held(run, s3=s3) as lease:
            proxy.cut(b".raylm.lock")  # the renewals never arrive
            lease.stop.wait(0.7)
            proxy.heal()
    err = capsys.readouterr().err
    assert "could not renew the lease" in err and "http://***@127.0.0.1" in err
    assert "secret" not in err


def test_a_holder_whose_lease_was_taken_stops_at_once(s3_server, s3_prefix):
    """A holder cut off from S3 for longer than its term loses the lease to a newcomer; when its
    renewal gets through again and finds the lease taken, it must stop writing the run, not
    write on beside the new holder until its own end (checkpoints, metrics and retention of
    two runs mixed in one directory)."""
    run = join(s3_prefix, "run")
    with TcpProxy(s3_server.endpoint) as proxy:
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from raylm import run_lock
            from raylm.config import S3Config
            from raylm.errors import StorageError
            try:
                with run_lock.held({run!r}, s3=S3Config(endpoint_url={proxy.url!r}, max_attempts=1)):
                    print("held", flush=True)
                    for _ in range(600):  # a run writing its directory for a minute
                        time.sleep(0.1)
                print("wrote on to the end", flush=True)
            except StorageError as e:
                print(e, flush=True)
                sys.exit(3)
        """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAYLM_S3_LEASE_S": "1"})
        try:
            assert holder.stdout.readline().strip() == "held"
            proxy.cut(b".raylm.lock")
            with run_lock.held(run):  # watches the unrenewed lease for its 1 s term, then takes it
                proxy.heal()
                out, err = holder.communicate(timeout=15)
                assert holder.returncode == 3, (out, err)
                assert "was taken over by another process" in out
                assert json.loads(storage.read_bytes(join(run, run_lock.RUN_LOCK)))["pid"] == os.getpid()
        finally:
            holder.kill()
            holder.wait()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("term", ['"soon"', "[1]", "NaN"])
def test_a_lease_with_a_term_that_is_no_number_is_watched_for_this_process_term(s3_prefix, monkeypatch, capsys, term):
    """`float(info["lease_s"])` of a lease written by something else: a ValueError/TypeError
    traceback instead of a lease watched and taken over, and a NaN term watched for ever."""
    monkeypatch.setattr(run_lock, "LEASE_S", 0.5)
    run = join(s3_prefix, "run")
    storage.write_bytes(join(run, run_lock.RUN_LOCK),
                        f'{{"holder": "a stranger", "machine": "elsewhere", "pid": 7, "lease_s": {term}}}'.encode())
    with run_lock.held(run):
        assert json.loads(storage.read_bytes(join(run, run_lock.RUN_LOCK)))["pid"] == os.getpid()
    assert "a stranger, left it without renewing for its 0 s term" in capsys.readouterr().err


def test_a_run_written_with_a_leading_slash_in_its_key_finds_its_checkpoints(s3_prefix):
    """`storage=s3://bucket//runs` (a '/' too many after the bucket, as `$BUCKET/$PREFIX` gives):
    every request sends the key without it, but listings named the files `s3://bucket/runs/...`,
    which were not under the run as written. The run's checkpoints were not found (a resume
    started from scratch and wrote over them; retention deleted none), and names cut from the
    listing lost a character."""
    from raylm import checkpoint

    bucket, prefix = storage._split_s3(s3_prefix)
    run = f"s3://{bucket}//{prefix}/run"
    for step in (1, 2, 3):
        ckpt = join(run, checkpoint.checkpoint_name(step))
        storage.write_bytes(join(ckpt, "model.bin"), b"w")
        checkpoint.commit(ckpt, {"step": step})
    assert [(s, d) for s, _, d in checkpoint.list_checkpoints(run)] == [(1, True), (2, True), (3, True)]
    assert checkpoint.latest_complete(run) == join(run, "ckpt-00000003")
    ckpt = join(run, "ckpt-00000003")
    assert [f.uri[len(ckpt) + 1:] for f in storage.list_files(ckpt, pattern=False)] == ["COMMITTED", "model.bin"]
    assert checkpoint.apply_retention(run, keep=1) == [join(run, "ckpt-00000001"), join(run, "ckpt-00000002")]
    assert rel(s3_prefix, storage.list_files(s3_prefix)) == ["run/ckpt-00000003/COMMITTED", "run/ckpt-00000003/model.bin"]
    assert storage.relative(f"{s3_prefix}/run/x", run) == "x"  # either spelling is under either
