"""An upload to S3 cut midway (a local read error, an interrupt) leaves the object it would
replace, or none: pyarrow's output stream completed the upload on close whatever had gone
wrong, and a partial object (half a checkpoint shard, a truncated export) appeared under the
name, replacing a whole one."""

import builtins
import os

import pytest

from raylm import storage
from raylm.storage import StorageError, join
from tests.unit.test_storage_copies_cut_midway import CutRead

pytestmark = pytest.mark.usefixtures("s3_server")


@pytest.mark.parametrize("size", [3000, 12 << 20], ids=["one-put", "multipart"])
def test_an_upload_cut_midway_leaves_the_old_object(s3_prefix, tmp_path, monkeypatch, size):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(size)
    (src / "shard.bin").write_bytes(data)
    uri = join(s3_prefix, "ckpt")
    storage.write_bytes(join(uri, "shard.bin"), b"old")

    def fake_open(path, mode="r", *args, **kwargs):
        if mode == "rb" and os.path.basename(path) == "shard.bin":
            return CutRead(path)
        return builtins.open(path, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(storage, "open", fake_open, raising=False)
        m.setattr(CutRead, "limit", size // 2)
        with pytest.raises(StorageError) as e:
            storage.upload_dir(str(src), uri)
    assert "Input/output error" in str(e.value) and "\n" not in str(e.value)
    assert [(i.uri, i.size) for i in storage.list_files(uri)] == [(join(uri, "shard.bin"), 3)]
    assert storage.read_bytes(join(uri, "shard.bin")) == b"old"

    storage.upload_dir(str(src), uri)  # and uncut, the whole file
    assert storage.read_bytes(join(uri, "shard.bin")) == data
