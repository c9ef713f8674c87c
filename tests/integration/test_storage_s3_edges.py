"""raylm.storage against the session's S3 server: downloads of a single object, paths listed
as names rather than patterns, and keys that need escaping in requests."""

import pytest

from raylm import storage
from raylm.storage import StorageError, join

pytestmark = pytest.mark.usefixtures("s3_server")


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
