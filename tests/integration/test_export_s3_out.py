"""An s3:// GGUF output that is not a new object key is refused before the checkpoint loads,
and nothing is written (SeaweedFS): an object already there was written over (only a raylm
marker beside it was checked), and an output with no object name went to a local `./s3:`
directory or to the wrong key."""

from __future__ import annotations

import pytest

from raylm import storage
from raylm.errors import ConfigError

pytestmark = pytest.mark.integration


@pytest.fixture
def gguf_export(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    import raylm.generate
    from raylm.export.gguf import export_run_gguf

    def no_load(uri, s3=None):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(raylm.generate, "load_for_inference", no_load)
    monkeypatch.chdir(tmp_path)  # where a misread output would have become a local directory
    return export_run_gguf


def _objects(prefix: str) -> list[str]:
    return [f.uri for f in storage.list_files(prefix)]


def test_s3_gguf_export_never_writes_over_an_existing_object(s3_server, s3_prefix, gguf_export):
    out = f"{s3_prefix}/models/m.gguf"
    storage.write_bytes(out, b"someone's file")
    with pytest.raises(FileExistsError, match=r": already exists; export to a new key$"):
        gguf_export(f"{s3_prefix}/run", out)
    assert storage.read_bytes(out) == b"someone's file" and _objects(s3_prefix) == [out]


def test_s3_gguf_export_needs_an_object_name(s3_server, s3_prefix, gguf_export, tmp_path):
    for out in (f"s3://{s3_server.bucket}", f"s3://{s3_server.bucket}/", f"{s3_prefix}/models/"):
        with pytest.raises(ConfigError, match="a GGUF export is one file; name its object") as e:
            gguf_export(f"{s3_prefix}/run", out)
        assert "\n" not in str(e.value)
    assert _objects(s3_prefix) == [] and list(tmp_path.iterdir()) == []
