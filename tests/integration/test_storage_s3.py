"""raylm.storage against a real S3 server (SeaweedFS on loopback, see tests/s3server.py)."""

import hashlib
import os
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.storage import StorageError, join

# Every test talks to the session's server, even those that need no s3_prefix: without it
# the clients would default to real AWS.
pytestmark = pytest.mark.usefixtures("s3_server")

MISSING_BUCKET = "raylm-no-such-bucket"


def rel(prefix: str, infos) -> list[str]:
    return [i.uri[len(prefix) + 1 :] for i in infos]


def put_tree(prefix: str, names: list[str]) -> None:
    for name in names:
        storage.write_bytes(join(prefix, name), name.encode())


def test_write_read_exists_overwrite(s3_prefix):
    uri = join(s3_prefix, "meta", "run.json")
    assert not storage.exists(uri)
    assert not storage.exists(join(s3_prefix, "meta"))
    storage.write_text(uri, '{"step": 1}')
    assert storage.exists(uri)
    assert storage.exists(join(s3_prefix, "meta"))  # a prefix with objects under it
    assert storage.exists(join(s3_prefix, "meta/"))
    assert not storage.exists(join(s3_prefix, "met"))  # a prefix of a name is not a directory
    assert storage.read_text(uri) == '{"step": 1}'
    storage.write_bytes(uri, b"\x00v2")
    assert storage.read_bytes(uri) == b"\x00v2"
    assert storage.exists(f"s3://{s3_prefix.split('/')[2]}")  # the bucket itself


def test_a_put_after_an_empty_one_is_sent_once(s3_prefix):
    """botocore's `Expect: 100-continue` after a zero-byte PUT leaves the pooled connection
    reading a stale status line: the next PUT waits out the read timeout and is silently sent
    again (boto/botocore#3755). raylm's client sends each PUT exactly once."""
    sent = []

    def count(request, **_):
        sent.append(request.method)

    client = storage.boto3_client()
    client.meta.events.register("before-send.s3", count)
    try:
        for i in range(2):
            storage.write_bytes(join(s3_prefix, f"empty{i}"), b"")
            storage.write_bytes(join(s3_prefix, f"full{i}"), b"x" * 1000)
    finally:
        client.meta.events.unregister("before-send.s3", count)
    assert sent == ["PUT"] * 4, f"{len(sent)} requests sent for 4 PUTs: a hidden retry"
    assert storage.read_bytes(join(s3_prefix, "full1")) == b"x" * 1000


def test_list_files_dir_file_and_globs(s3_prefix):
    names = ["a.txt", "b.parquet", "sub/c.parquet", "sub/deeper/d.parquet", "sub/e.txt", "subx/f.parquet"]
    put_tree(s3_prefix, names)
    infos = storage.list_files(s3_prefix)
    assert rel(s3_prefix, infos) == sorted(names)
    for info in infos:
        content = info.uri[len(s3_prefix) + 1 :].encode()
        assert info.size == len(content)
        assert info.etag_or_mtime == hashlib.md5(content).hexdigest()  # single-PUT ETag is the MD5
    # A directory lists recursively, and `sub` does not include its sibling `subx`.
    assert rel(s3_prefix, storage.list_files(join(s3_prefix, "sub"))) == [
        "sub/c.parquet",
        "sub/deeper/d.parquet",
        "sub/e.txt",
    ]
    assert rel(s3_prefix, storage.list_files(join(s3_prefix, "a.txt"))) == ["a.txt"]
    assert rel(s3_prefix, storage.list_files(s3_prefix + "/*.parquet")) == ["b.parquet"]
    assert rel(s3_prefix, storage.list_files(s3_prefix + "/**/*.parquet")) == [
        "b.parquet",
        "sub/c.parquet",
        "sub/deeper/d.parquet",
        "subx/f.parquet",
    ]
    assert rel(s3_prefix, storage.list_files(s3_prefix + "/sub/**")) == [
        "sub/c.parquet",
        "sub/deeper/d.parquet",
        "sub/e.txt",
    ]
    assert rel(s3_prefix, storage.list_files(s3_prefix + "/sub?/*")) == ["subx/f.parquet"]
    assert rel(s3_prefix, storage.list_files(s3_prefix + "/*/*.txt")) == ["sub/e.txt"]
    assert storage.list_files(s3_prefix + "/nothing/*") == []
    assert storage.list_files(join(s3_prefix, "missing")) == []


def test_list_skips_directory_markers(s3_prefix):
    # pyarrow writes zero-byte `dir/` objects as directory markers; they are not files.
    fs, path = storage.filesystem(join(s3_prefix, "marked"))
    fs.create_dir(path)
    storage.write_text(join(s3_prefix, "marked", "x"), "x")
    assert rel(s3_prefix, storage.list_files(s3_prefix)) == ["marked/x"]


def test_delete_file_and_prefix(s3_prefix):
    put_tree(s3_prefix, ["d", "d/1", "d/e/2", "dx/3", "keep"])
    storage.delete(join(s3_prefix, "keep"))
    assert not storage.exists(join(s3_prefix, "keep"))
    storage.delete(join(s3_prefix, "d"))  # the object `d` and everything under `d/`, not `dx/`
    assert rel(s3_prefix, storage.list_files(s3_prefix)) == ["dx/3"]
    storage.delete(join(s3_prefix, "missing"))  # missing is fine
    storage.delete(s3_prefix)
    assert storage.list_files(s3_prefix) == []
    assert not storage.exists(s3_prefix)
    with pytest.raises(StorageError, match="whole bucket"):
        storage.delete(f"s3://{s3_prefix.split('/')[2]}")


def test_delete_in_several_batches(s3_prefix, monkeypatch):
    # DeleteObjects takes at most 1000 keys, so big prefixes go in batches; use small ones.
    monkeypatch.setattr(storage, "_DELETE_BATCH", 3)
    put_tree(s3_prefix, [f"many/{i}" for i in range(7)] + ["other"])
    storage.delete(join(s3_prefix, "many"))
    assert rel(s3_prefix, storage.list_files(s3_prefix)) == ["other"]


def test_upload_download_dir_round_trip(tmp_path, s3_prefix):
    src = tmp_path / "src"
    files = {"a.bin": os.urandom(1000), "n1/b.txt": b"b", "n1/n2/n3/c.txt": b"deep", "n1/n2/d": b""}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    uri = join(s3_prefix, "ckpt")
    storage.upload_dir(str(src), uri)
    assert rel(uri, storage.list_files(uri)) == sorted(files)
    # Uploading again overwrites in place.
    (src / "n1" / "b.txt").write_bytes(b"b2")
    storage.upload_dir(str(src), uri)
    files["n1/b.txt"] = b"b2"

    dst = tmp_path / "dst"
    storage.download_dir(uri, str(dst))
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == files


def test_multipart_object_round_trip(tmp_path, s3_prefix):
    data = os.urandom(12 * 1024 * 1024 + 123)  # > pyarrow's 5/10 MiB parts: several parts
    uri = join(s3_prefix, "big", "blob.bin")
    fs, path = storage.filesystem(uri)
    with fs.open_output_stream(path) as out:
        for i in range(0, len(data), 1 << 20):
            out.write(data[i : i + (1 << 20)])
    (info,) = storage.list_files(uri)
    assert info.size == len(data)
    assert "-" in info.etag_or_mtime  # a multipart ETag is `<md5 of md5s>-<parts>`
    assert storage.read_bytes(uri) == data
    with fs.open_input_file(path) as f:
        assert f.read() == data
    storage.download_dir(join(s3_prefix, "big"), str(tmp_path / "big"))
    assert (tmp_path / "big" / "blob.bin").read_bytes() == data


def test_filesystem_with_parquet_and_pickle(s3_prefix):
    table = pa.table({"id": list(range(100)), "text": [f"row {i}" for i in range(100)]})
    fs, path = storage.filesystem(join(s3_prefix, "ds", "part-0.parquet"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == s3_prefix[len("s3://") :] + "/ds/part-0.parquet"
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # The directory reads as a dataset; the filesystem survives pickling (Ray ships it).
    fs2, dir_path = storage.filesystem(join(s3_prefix, "ds"))
    assert fs2 is fs  # cached per endpoint/region
    clone = pickle.loads(pickle.dumps(fs))
    assert pq.read_table(dir_path, filesystem=clone).equals(table)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "op",
    ["read_bytes", "write_bytes", "exists", "list_files", "delete", "upload_dir", "download_dir"],
)
def test_missing_bucket_is_named(op, tmp_path):
    uri = f"s3://{MISSING_BUCKET}/x/y"
    calls = {
        "read_bytes": lambda: storage.read_bytes(uri),
        "write_bytes": lambda: storage.write_bytes(uri, b"x"),
        "exists": lambda: storage.exists(uri),
        "list_files": lambda: storage.list_files(uri),
        "delete": lambda: storage.delete(uri),
        "upload_dir": lambda: storage.upload_dir(str(tmp_path), uri),
        "download_dir": lambda: storage.download_dir(uri, str(tmp_path / "d")),
    }
    (tmp_path / "f").write_text("f")
    with pytest.raises(StorageError) as e:
        calls[op]()
    assert str(e.value) == f"{uri}: bucket does not exist (create it or fix the URI)"


def test_missing_bucket_root_does_not_exist():
    assert not storage.exists(f"s3://{MISSING_BUCKET}")


@pytest.fixture(params=[("AWS_SECRET_ACCESS_KEY", "wrong-secret"), ("AWS_ACCESS_KEY_ID", "nobody")])
def bad_credentials(request, s3_server, monkeypatch):
    """Wrong credentials in the environment, with the client cache cleared around them."""
    monkeypatch.setenv(*request.param)
    storage.clear_cache()
    yield request.param[1]
    storage.clear_cache()


@pytest.mark.parametrize("op", ["read_bytes", "write_bytes", "exists", "list_files", "upload_dir"])
def test_wrong_credentials_say_access_denied(bad_credentials, op, s3_prefix, tmp_path):
    uri = join(s3_prefix, "x")
    (tmp_path / "f").write_text("f")
    calls = {
        "read_bytes": lambda: storage.read_bytes(uri),
        "write_bytes": lambda: storage.write_bytes(uri, b"x"),
        "exists": lambda: storage.exists(uri),
        "list_files": lambda: storage.list_files(uri),
        "upload_dir": lambda: storage.upload_dir(str(tmp_path), uri),  # through pyarrow
    }
    with pytest.raises(StorageError) as e:
        calls[op]()
    msg = str(e.value)
    assert msg.startswith(f"{uri}: access denied")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in msg
    assert bad_credentials not in msg and os.environ["AWS_SECRET_ACCESS_KEY"] not in msg  # no secrets


def test_missing_key_is_named(s3_prefix, tmp_path):
    uri = join(s3_prefix, "nope.json")
    for call in (lambda: storage.read_bytes(uri), lambda: storage.download_dir(uri, str(tmp_path / "d"))):
        with pytest.raises(StorageError) as e:
            call()
        assert str(e.value) == f"{uri}: no such file or directory"
    # pyarrow's own error for a missing key maps the same way.
    fs, path = storage.filesystem(uri)
    with pytest.raises(StorageError, match="no such file or directory"):
        with storage._errors(uri):
            fs.open_input_stream(path)


def test_unreachable_endpoint():
    from raylm.config import S3Config

    dead = S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=1)  # discard port: refused
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        storage.read_bytes("s3://b/x", dead)
    fs, path = storage.filesystem("s3://b/x", dead)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        with storage._errors("s3://b/x", dead):
            fs.get_file_info(path)


def test_a_config_file_in_s3_loads_as_a_local_one(s3_prefix, s3_server):
    """`raylm tune` writes the best config to the search's storage, s3:// on a cluster, and its
    docs hand it to `pretrain --config`; load_config read only local files."""
    from raylm.config import ConfigError, load_config

    uri = join(s3_prefix, "best.yaml")
    storage.write_text(uri, "train:\n  lr: 0.0123\nmodel:\n  n_layers: 3\n")
    cfg = load_config(uri, [f"s3.endpoint_url={s3_server.endpoint}", "train.max_steps=7"])
    assert (cfg.train.lr, cfg.model.n_layers, cfg.train.max_steps) == (0.0123, 3, 7)
    with pytest.raises(ConfigError, match=rf"^config file {join(s3_prefix, 'absent.yaml')}: not found$"):
        load_config(join(s3_prefix, "absent.yaml"))
    storage.write_bytes(join(s3_prefix, "latin1.yaml"), "train: {lr: 0.1}  # \xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load_config(join(s3_prefix, "latin1.yaml"))
