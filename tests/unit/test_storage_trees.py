"""raylm.storage on local trees: nothing left out of a listing or a copy without a word, no
copy onto itself, replaced files keep their mode, and paths that must not be read as patterns."""

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from raylm import storage
from raylm.storage import StorageError


def names(root, infos) -> list[str]:
    return [os.path.relpath(i.uri, root) for i in infos]


def make_tree(root, rel_names):
    for name in rel_names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(name)


@pytest.fixture
def unreadable(monkeypatch):
    """Make directories unreadable, as for a user who is not their owner (tests run as root,
    which reads everything): returns a function that adds one."""
    blocked = set()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return lambda path: blocked.add(str(path))


# --------------------------------------------------------------------------- write


def test_replacing_a_private_file_keeps_it_private(tmp_path):
    """The atomic write made a new file with the umask's mode: a 0600 file came back 0644."""
    path = tmp_path / "state.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    storage.write_text(str(path), "new")
    assert path.read_text() == "new"
    assert os.stat(path).st_mode & 0o7777 == 0o600
    os.chmod(path, 0o4755)  # set-id bits are not carried onto new content
    storage.write_text(str(path), "newer")
    assert os.stat(path).st_mode & 0o7777 == 0o755


# --------------------------------------------------------------------------- listing


@pytest.mark.parametrize("follow_links", [False, True])
def test_a_link_to_nothing_in_a_listing_is_named(tmp_path, follow_links):
    """A corpus part behind a dangling link was left out of the listing without a word."""
    make_tree(tmp_path, ["p1.jsonl", "sub/p2.jsonl"])
    os.symlink(tmp_path / "gone" / "p3.jsonl", tmp_path / "p3.jsonl")
    for listed in (str(tmp_path), str(tmp_path) + "/*.jsonl", str(tmp_path) + "/**"):
        with pytest.raises(StorageError) as e:
            storage.list_files(listed, follow_links=follow_links)
        assert str(e.value) == f"{tmp_path}/p3.jsonl: a link to a missing file (fix or remove the link)"
    # A pattern that does not select it lists the rest.
    assert names(tmp_path, storage.list_files(str(tmp_path) + "/sub/*", follow_links=follow_links)) == [
        "sub/p2.jsonl"]
    # A hidden one is no data: an editor's lock file (`.#name`) is a link to nothing.
    os.unlink(tmp_path / "p3.jsonl")
    os.symlink("user@host.1234:1700000000", tmp_path / "sub" / ".#p2.jsonl")
    assert names(tmp_path, storage.list_files(str(tmp_path), follow_links=follow_links)) == [
        "p1.jsonl", "sub/p2.jsonl"]


def test_an_unreadable_directory_in_a_listing_is_named(tmp_path, unreadable):
    """os.walk skipped a directory it could not read: its files were silently not listed."""
    make_tree(tmp_path, ["a.jsonl", "private/b.jsonl", "private/deeper/c.jsonl"])
    unreadable(tmp_path / "private")
    for listed in (str(tmp_path), str(tmp_path) + "/**/*.jsonl", str(tmp_path) + "/*/b.jsonl"):
        with pytest.raises(StorageError) as e:
            storage.list_files(listed, follow_links=True)
        assert str(e.value).startswith(f"{tmp_path}/private: permission denied")
    # A pattern that cannot match below it does not need it, nor anything deeper.
    assert names(tmp_path, storage.list_files(str(tmp_path) + "/*.jsonl")) == ["a.jsonl"]
    # Missing is still an empty listing, not an error.
    assert storage.list_files(str(tmp_path / "missing")) == []
    assert storage.list_files(str(tmp_path / "missing" / "*.jsonl")) == []


def test_directories_that_never_hold_data_may_stay_unread(tmp_path, unreadable):
    """A corpus at a volume's root holds lost+found, which only root may read; hidden
    directories are no corpus either."""
    make_tree(tmp_path, ["a.jsonl", "lost+found/x", ".cache/y"])
    unreadable(tmp_path / "lost+found")
    unreadable(tmp_path / ".cache")
    assert names(tmp_path, storage.list_files(str(tmp_path), follow_links=True)) == ["a.jsonl"]
    assert names(tmp_path, storage.list_files(str(tmp_path) + "/**")) == ["a.jsonl"]


def test_a_glob_reaches_only_its_depth(tmp_path):
    make_tree(tmp_path, ["a/x.txt", "a/b/x.txt", "a/b/c/x.txt", "a/bb/x.txt"])
    root = str(tmp_path)
    assert names(root, storage.list_files(root + "/a/*/x.txt")) == ["a/b/x.txt", "a/bb/x.txt"]
    assert names(root, storage.list_files(root + "/a/*")) == ["a/x.txt"]
    assert names(root, storage.list_files(root + "/?/**/x.txt")) == [
        "a/b/c/x.txt", "a/b/x.txt", "a/bb/x.txt", "a/x.txt"]


def test_a_path_with_wildcards_lists_literally_when_asked(tmp_path):
    """An output path holding `*` was read as a pattern: `data prepare --out 'prep*'` listed
    `prepare.py` beside it instead of its own stale attempts (then failed: not under out)."""
    make_tree(tmp_path, ["prep*/attempt-1/s.parquet", "prep*/attempt-2/s", "prepare.py", "prep?x/y"])
    out = str(tmp_path / "prep*")
    assert names(tmp_path, storage.list_files(out, pattern=False)) == [
        "prep*/attempt-1/s.parquet", "prep*/attempt-2/s"]
    assert names(tmp_path, storage.list_files(str(tmp_path / "prep?x"), pattern=False)) == ["prep?x/y"]
    assert names(tmp_path, storage.list_files(out)) == ["prepare.py"]  # the default: a pattern


# --------------------------------------------------------------------------- upload


def test_upload_refuses_what_it_would_leave_out_before_writing(tmp_path, unreadable):
    """A linked directory, or one that could not be read, was skipped without a word: the copy
    looked complete. Now each is named, and nothing is written."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    make_tree(src, ["a.txt", "sub/b.txt"])
    make_tree(outside, ["c.txt"])
    dst = str(tmp_path / "dst")

    os.symlink(outside, src / "linked")
    with pytest.raises(StorageError, match=rf"^{src}/linked: a link to a directory"):
        storage.upload_dir(str(src), dst)
    os.unlink(src / "linked")

    os.symlink(outside / "gone.txt", src / "dangling.txt")
    with pytest.raises(StorageError, match=rf"^{src}/dangling.txt: a link to a missing file"):
        storage.upload_dir(str(src), dst)
    os.unlink(src / "dangling.txt")

    os.mkfifo(src / "pipe")
    with pytest.raises(StorageError, match=rf"^{src}/pipe: not a regular file"):
        storage.upload_dir(str(src), dst)  # not a wait for ever on the pipe
    os.unlink(src / "pipe")

    # A linked file is copied as the file it names.
    os.symlink(outside / "c.txt", src / "c.txt")
    storage.upload_dir(str(src), dst + "2")
    assert sorted(os.listdir(dst + "2")) == ["a.txt", "c.txt", "sub"]

    unreadable(src / "sub")
    with pytest.raises(StorageError, match=rf"^{src}/sub: permission denied"):
        storage.upload_dir(str(src), dst)
    assert not os.path.exists(dst)


@pytest.mark.parametrize("into", ["", "/", "/sub", "/sub/deeper"])
def test_upload_into_itself_is_refused(tmp_path, into):
    """upload_dir(d, d) opened each file for writing before reading it: every file came out empty."""
    src = tmp_path / "src"
    make_tree(src, ["a.txt", "sub/b.txt"])
    with pytest.raises(StorageError, match="inside the directory being copied"):
        storage.upload_dir(str(src), str(src) + into)
    os.symlink(src, tmp_path / "alias")  # the same directory by another name
    with pytest.raises(StorageError, match="inside the directory being copied"):
        storage.upload_dir(str(src), str(tmp_path / "alias") + into)
    assert (src / "a.txt").read_text() == "a.txt" and (src / "sub" / "b.txt").read_text() == "sub/b.txt"
    storage.upload_dir(str(src / "sub"), str(tmp_path / "srcx"))  # a sibling sharing a name prefix is fine
    assert (tmp_path / "srcx" / "b.txt").read_text() == "sub/b.txt"


def test_download_of_a_file_says_it_is_a_file(tmp_path):
    """The error blamed the file for being a directory (the destination's error, on its name)."""
    (tmp_path / "tokenizer.model").write_text("x")
    uri = str(tmp_path / "tokenizer.model")
    with pytest.raises(StorageError) as e:
        storage.download_dir(uri, str(tmp_path / "d"))
    assert str(e.value) == f"{uri}: is a file, not a directory (name the directory holding it)"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("uri", ["s3://my bucket/x", "s3://Bad!/x"])
def test_an_invalid_bucket_name_is_one_short_line(uri):
    """botocore refuses the name before sending; its text quoted two long regular expressions."""
    from raylm.config import S3Config

    dead = S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=1)  # never reached
    for call in (storage.read_bytes, storage.exists, storage.list_files, storage.delete):
        with pytest.raises(StorageError) as e:
            call(uri, dead)
        assert str(e.value) == f"{uri}: {storage._BAD_BUCKET}"


# --------------------------------------------------------------------------- download


class _Bucket(pafs.FileSystemHandler):
    """A read-only object store holding `objects` ({"bucket/key": bytes}) under whatever keys
    it is given: S3 takes '..' and empty segments in a key as plain characters."""

    def __init__(self, objects):
        self.objects = objects

    def get_type_name(self):
        return "fake-s3"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        def one(p):
            if p in self.objects:
                return pafs.FileInfo(p, pafs.FileType.File, size=len(self.objects[p]))
            if any(k.startswith(p.rstrip("/") + "/") for k in self.objects):
                return pafs.FileInfo(p, pafs.FileType.Directory)
            return pafs.FileInfo(p, pafs.FileType.NotFound)
        return [one(p) for p in paths]

    def get_file_info_selector(self, selector):
        base = selector.base_dir.rstrip("/") + "/"
        return [pafs.FileInfo(k, pafs.FileType.File, size=len(v)) for k, v in self.objects.items()
                if k.startswith(base)]

    def open_input_stream(self, path):
        return pa.BufferReader(self.objects[path])

    def open_input_file(self, path):
        return pa.BufferReader(self.objects[path])

    def _read_only(self, *args, **kwargs):
        raise OSError("read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


@pytest.mark.parametrize("key", ["tok/../../escape.txt", "tok/./x.txt", "tok/a//x.txt", "tok/sub/.."])
def test_a_download_never_writes_outside_its_directory(tmp_path, monkeypatch, key):
    """pyarrow's copy_files joined each key to the destination as it was: a key
    `tok/../../escape.txt` in a bucket was written two directories above the download."""
    objects = {"b/tok/ok.txt": b"ok", f"b/{key}": b"evil"}
    fs = pafs.PyFileSystem(_Bucket(objects))
    monkeypatch.setattr(storage, "exists", lambda uri, s3=None: True)
    monkeypatch.setattr(storage, "filesystem", lambda uri, s3=None: (fs, uri[len("s3://"):].rstrip("/")))
    dst = tmp_path / "x" / "y" / "dst"
    with pytest.raises(StorageError) as e:
        storage.download_dir("s3://b/tok", str(dst))
    assert str(e.value).startswith(f"s3://b/{key}: not a name a local file can have")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # refused before writing anything
    del objects[f"b/{key}"]
    storage.download_dir("s3://b/tok", str(dst))
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == ["x/y/dst/ok.txt"]


def test_a_local_download_into_itself_is_refused(tmp_path):
    make_tree(tmp_path / "src", ["a.txt"])
    for into in ("", "/sub"):
        with pytest.raises(StorageError, match="inside the directory being copied"):
            storage.download_dir(str(tmp_path / "src"), str(tmp_path / "src") + into)
    assert (tmp_path / "src" / "a.txt").read_text() == "a.txt"
