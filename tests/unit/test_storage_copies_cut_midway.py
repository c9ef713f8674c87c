"""Local tree copies (upload_dir to a directory, download_dir into one) write each file whole or
not at all: a copy cut midway left the destination file truncated to what had arrived, with
the content it replaced gone, and a download wrote through a link it found in its directory."""

import builtins
import errno
import io
import os

import pytest

from raylm import storage
from raylm.storage import StorageError


class CutRead(io.FileIO):
    """A file whose reads fail past `limit` bytes, as a failing disk or mount does."""

    limit = 0

    def read(self, size=-1):
        left = self.limit - self.tell()
        if left <= 0:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(left if size is None or size < 0 else min(size, left))


@pytest.fixture
def cut_reads(monkeypatch):
    """Source files opened by raylm.storage fail halfway through: returns the limit's setter."""

    def fake_open(path, mode="r", *args, **kwargs):
        if mode == "rb" and os.path.basename(path) == "shard.bin":
            return CutRead(path)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(storage, "open", fake_open, raising=False)
    return lambda limit: setattr(CutRead, "limit", limit)


def test_a_local_upload_cut_midway_keeps_the_file_it_would_replace(tmp_path, cut_reads):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "shard.bin").write_bytes(b"n" * 3000)
    (dst / "shard.bin").write_bytes(b"old")
    os.chmod(dst / "shard.bin", 0o600)
    cut_reads(1000)
    with pytest.raises(StorageError, match="Input/output error"):
        storage.upload_dir(str(src), str(dst))
    assert (dst / "shard.bin").read_bytes() == b"old"
    assert sorted(os.listdir(dst)) == ["shard.bin"]  # no temp file left behind

    cut_reads(1 << 30)
    storage.upload_dir(str(src), str(dst))
    assert (dst / "shard.bin").read_bytes() == b"n" * 3000
    assert (dst / "shard.bin").stat().st_mode & 0o777 == 0o600  # replaced, as written in place would be


def test_a_download_cut_midway_keeps_the_file_it_would_replace(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    storage.write_bytes(str(src / "shard.bin"), b"n" * 3000)
    storage.write_bytes(str(dst / "shard.bin"), b"old")

    def cut(f, out, length=0):
        out.write(f.read(1000))
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(storage.shutil, "copyfileobj", cut)
        with pytest.raises(StorageError, match="Input/output error"):
            storage.download_dir(str(src), str(dst))
    assert (dst / "shard.bin").read_bytes() == b"old"
    assert sorted(os.listdir(dst)) == ["shard.bin"]
    storage.download_dir(str(src), str(dst))
    assert (dst / "shard.bin").read_bytes() == b"n" * 3000


def test_a_download_replaces_a_link_it_finds_and_never_writes_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    src, dst = tmp_path / "src", tmp_path / "dst"
    storage.write_bytes(str(src / "tokenizer.json"), b"{}")
    dst.mkdir()
    os.symlink(victim, dst / "tokenizer.json")
    storage.download_dir(str(src), str(dst))
    assert victim.read_bytes() == b"keep me"
    assert not (dst / "tokenizer.json").is_symlink()
    assert (dst / "tokenizer.json").read_bytes() == b"{}"
