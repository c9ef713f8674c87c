"""raylm.storage on local paths, plus the S3 plumbing that needs no server."""

import os
import pickle

import pyarrow.fs as pafs
import pytest

from raylm import storage
from raylm.config import S3Config
from raylm.storage import FileInfo, StorageError, join


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch):
    """Tests here must not depend on, or reach, any real AWS setup."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.clear_cache()
    yield
    storage.clear_cache()


def names(root, infos: list[FileInfo]) -> list[str]:
    return [os.path.relpath(i.uri, root) for i in infos]


def make_tree(root, rel_names):
    for name in rel_names:
        storage.write_bytes(join(str(root), name), name.encode())


# --------------------------------------------------------------------------- URIs


def test_is_s3():
    assert storage.is_s3("s3://bucket/key")
    assert not storage.is_s3("/data/s3://x")
    assert not storage.is_s3("relative/path")
    assert not storage.is_s3("gs://bucket/key")


def test_join():
    assert join("s3://b", "x", "y.json") == "s3://b/x/y.json"
    assert join("s3://b/", "/x/", "", "y") == "s3://b/x/y"
    assert join("s3://b/p") == "s3://b/p"
    assert join("/data", "a", "b.txt") == "/data/a/b.txt"
    assert join("/data/", "/a/") == "/data/a"  # a leading slash does not restart at the root
    assert join("rel", "a") == "rel/a"


def test_filesystem_local(tmp_path, monkeypatch):
    fs, path = storage.filesystem(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "x")
    monkeypatch.chdir(tmp_path)
    assert storage.filesystem("rel/y")[1] == str(tmp_path / "rel" / "y")
    assert storage.filesystem(f"file://{tmp_path}/z")[1] == str(tmp_path / "z")
    with pytest.raises(StorageError, match="^gs://b/x: unsupported scheme"):
        storage.filesystem("gs://b/x")


def test_filesystem_s3_options_cache_and_pickle():
    cfg = S3Config(endpoint_url="http://127.0.0.1:9/", region="eu-west-1", max_attempts=5)
    fs, path = storage.filesystem("s3://bucket/a/b/", cfg)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/a/b"
    assert storage.filesystem("s3://bucket", cfg)[1] == "bucket"
    assert fs.region == "eu-west-1"
    opts = pafs.S3FileSystem.__reduce__(fs)[1][0]  # pyarrow's own view of its options
    assert opts["endpoint_override"] == "127.0.0.1:9"
    assert opts["scheme"] == "http"
    assert opts["access_key"] is None  # credentials left to the default chain
    assert storage.filesystem("s3://other/k", cfg)[0] is fs  # cached per endpoint/region
    assert storage.filesystem("s3://bucket/a", S3Config(region="us-west-2"))[0] is not fs
    # Pickling (how Ray ships it) keeps endpoint, region and the retry policy.
    clone = pickle.loads(pickle.dumps(fs))
    assert isinstance(clone, pafs.S3FileSystem)
    assert clone._raylm_args == ("http://127.0.0.1:9", "eu-west-1", 5)
    assert clone.region == "eu-west-1"


def test_s3_settings_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://generic.example:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    fs, _ = storage.filesystem("s3://b/k")
    assert fs._raylm_args == ("https://generic.example:1", "ap-south-1", S3Config().max_attempts)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")  # wins over the generic one
    monkeypatch.setenv("AWS_REGION", "eu-north-1")  # wins over AWS_DEFAULT_REGION
    client = storage.boto3_client()
    assert client.meta.endpoint_url == "http://s3-specific:2"
    assert client.meta.region_name == "eu-north-1"
    # Attempts in total, first try included, as for pyarrow (botocore's max_attempts = retries).
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 8}
    assert client.meta.config.s3 == {"addressing_style": "path"}  # custom endpoints: no bucket subdomains
    # The config beats the environment.
    client = storage.boto3_client(S3Config(endpoint_url="http://cfg:3", region="us-west-1", max_attempts=2))
    assert (client.meta.endpoint_url, client.meta.region_name) == ("http://cfg:3", "us-west-1")
    assert client.meta.config.retries["total_max_attempts"] == 2
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    fs, _ = storage.filesystem("s3://b/k")
    assert fs._raylm_args == ("", "us-east-1", 8)  # plain AWS
    assert pafs.S3FileSystem.__reduce__(fs)[1][0]["scheme"] == "https"


def test_bad_endpoint_and_uri():
    with pytest.raises(StorageError, match="must start with http:// or https://"):
        storage.filesystem("s3://b/k", S3Config(endpoint_url="127.0.0.1:9000"))
    with pytest.raises(StorageError, match=r"^s3:///k: no bucket in URI"):
        storage.filesystem("s3:///k")


# --------------------------------------------------------------------------- small files


def test_write_read_exists(tmp_path):
    uri = join(str(tmp_path), "a", "b", "meta.json")  # parents are created
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo")
    assert storage.exists(uri)
    assert storage.exists(str(tmp_path / "a"))
    assert storage.read_text(uri) == "héllo"
    assert storage.read_bytes(uri) == "héllo".encode()
    storage.write_bytes(uri, memoryview(b"v2"))
    assert storage.read_bytes(uri) == b"v2"


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    uri = str(tmp_path / "state.json")
    for i in range(5):
        storage.write_text(uri, f"v{i}")
    assert os.listdir(tmp_path) == ["state.json"]
    assert (os.stat(uri).st_mode & 0o777) == 0o666 & ~_umask()  # same mode as a plain open()

    # A write that fails before the rename keeps the old content and cleans up after itself.
    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="permission denied"):
        storage.write_text(uri, "new")
    assert storage.read_text(uri) == "v4"
    assert os.listdir(tmp_path) == ["state.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_local_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(StorageError) as e:
        storage.read_bytes(missing)
    assert str(e.value) == f"{missing}: no such file or directory"
    assert isinstance(e.value, OSError) and e.value.uri == missing
    clone = pickle.loads(pickle.dumps(e.value))  # Ray ships exceptions between processes
    assert type(clone) is StorageError and str(clone) == str(e.value) and clone.uri == missing
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"file/child: "):
        storage.write_text(str(tmp_path / "file" / "child"), "x")


# --------------------------------------------------------------------------- listing


SUB = ["sub/c.parquet", "sub/deeper/d.parquet", "sub/e.txt"]
TREE = ["a.txt", "b.parquet", "sub/c.parquet", "sub/deeper/d.parquet", "sub/e.txt", "subx/f.parquet"]


def test_list_files_dir_file_and_globs(tmp_path):
    make_tree(tmp_path, TREE)
    root = str(tmp_path)
    infos = storage.list_files(root)
    assert names(root, infos) == sorted(TREE)
    assert all(i.size == len(os.path.relpath(i.uri, root)) for i in infos)
    assert all(i.etag_or_mtime.isdigit() for i in infos)
    assert names(root, storage.list_files(join(root, "sub"))) == SUB
    assert names(root, storage.list_files(join(root, "a.txt"))) == ["a.txt"]
    assert names(root, storage.list_files(root + "/*.parquet")) == ["b.parquet"]
    assert names(root, storage.list_files(root + "/**/*.parquet")) == [
        "b.parquet",
        "sub/c.parquet",
        "sub/deeper/d.parquet",
        "subx/f.parquet",
    ]
    assert names(root, storage.list_files(root + "/sub/**")) == SUB
    assert names(root, storage.list_files(root + "/sub?/*")) == ["subx/f.parquet"]
    assert names(root, storage.list_files(root + "/*/*.txt")) == ["sub/e.txt"]
    assert names(root, storage.list_files(root + "/?.txt")) == ["a.txt"]
    assert storage.list_files(root + "/nothing/*") == []
    assert storage.list_files(join(root, "missing")) == []


def test_list_skips_in_flight_temp_files(tmp_path):
    make_tree(tmp_path, ["done.json"])
    (tmp_path / ".next.json.0123abcd.raylm-tmp").write_text("half")
    assert names(str(tmp_path), storage.list_files(str(tmp_path))) == ["done.json"]


@pytest.mark.parametrize(
    "pattern, path, matches",
    [
        ("a/*.txt", "a/x.txt", True),
        ("a/*.txt", "a/b/x.txt", False),  # * stays within a segment
        ("a/**/x.txt", "a/x.txt", True),  # **/ matches zero directories
        ("a/**/x.txt", "a/b/c/x.txt", True),
        ("a/**", "a/b/c", True),
        ("a/?.txt", "a/xy.txt", False),
        ("a/?", "a//", False),  # ? never matches '/'
        ("a.b/[x].txt", "a.b/[x].txt", True),  # regex characters are literal
        ("a.b/*.txt", "axb/y.txt", False),
    ],
)
def test_glob_semantics(pattern, path, matches):
    assert bool(storage._glob_regex(pattern).match(path)) is matches


# --------------------------------------------------------------------------- trees


def test_delete_file_dir_and_missing(tmp_path):
    make_tree(tmp_path, ["d/1", "d/e/2", "dx/3", "keep"])
    root = str(tmp_path)
    storage.delete(join(root, "keep"))
    storage.delete(join(root, "d"))
    storage.delete(join(root, "missing"))
    assert names(root, storage.list_files(root)) == ["dx/3"]


def test_makedirs_upload_download_round_trip(tmp_path):
    src = tmp_path / "src"
    files = {"a.bin": os.urandom(100), "n1/n2/n3/c.txt": b"deep", "n1/d": b""}
    for name, data in files.items():
        storage.write_bytes(str(src / name), data)
    storage.makedirs(str(src / "empty" / "dir"))
    assert (src / "empty" / "dir").is_dir()
    storage.makedirs("s3://bucket/prefix")  # no-op: nothing to create on S3

    storage.upload_dir(str(src), str(tmp_path / "remote"))
    storage.download_dir(str(tmp_path / "remote"), str(tmp_path / "back"))
    back = tmp_path / "back"
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files

    with pytest.raises(StorageError, match="no such directory"):
        storage.upload_dir(str(tmp_path / "nope"), str(tmp_path / "x"))
    with pytest.raises(StorageError, match="no such file or directory"):
        storage.download_dir(str(tmp_path / "nope"), str(tmp_path / "y"))


def test_relative_takes_any_spelling_of_a_local_base(tmp_path, monkeypatch):
    """`raylm generate runs/x` failed with "no complete checkpoint" because listings come back
    absolute and were cut by the length of the relative prefix."""
    from raylm import checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x" / "ckpt-00000003").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "ckpt-00000003" / "COMMITTED").write_text("{}")
    for base in ("runs/x", "./runs/x", "runs/x/", str(tmp_path / "runs" / "x"), f"file://{tmp_path}/runs/x"):
        [info] = storage.list_files(base)
        assert storage.relative(info.uri, base) == "ckpt-00000003/COMMITTED"
        assert checkpoint.latest_complete(base) is not None, base
    assert storage.relative("s3://b/p/q/r", "s3://b/p/") == "q/r"
    with pytest.raises(ValueError):
        storage.relative("s3://b/other/r", "s3://b/p")


def test_linked_directories_are_listed_and_a_link_loop_ends(tmp_path):
    shared = tmp_path / "shared"
    make_tree(shared, ["b.jsonl", "deep/c.jsonl"])
    corpus = tmp_path / "corpus"
    make_tree(corpus, ["a.jsonl"])
    os.symlink(shared, corpus / "more")  # a corpus gathering its parts by links
    os.symlink(corpus, shared / "deep" / "up")  # and a loop back up the tree
    assert names(str(corpus), storage.list_files(str(corpus), follow_links=True)) == [
        "a.jsonl", "more/b.jsonl", "more/deep/c.jsonl"]
    assert names(str(corpus), storage.list_files(str(corpus) + "/**/*.jsonl", follow_links=True)) == [
        "a.jsonl", "more/b.jsonl", "more/deep/c.jsonl"]
    assert names(str(corpus), storage.list_files(str(corpus))) == ["a.jsonl"]  # other listings stay in the tree


@pytest.mark.parametrize("endpoint", ["http:/AKID:Pw1@host:9000", "http//AKID:Pw1@host:9000", "AKID:Pw1@host"])
def test_a_malformed_endpoint_is_refused_without_its_password(endpoint):
    from raylm.config import S3Config

    with pytest.raises(storage.StorageError) as e:
        storage.filesystem("s3://b/k", S3Config(endpoint_url=endpoint))
    assert "Pw1" not in str(e.value) and "***@host" in str(e.value)
