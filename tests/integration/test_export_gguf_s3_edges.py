"""s3:// GGUF export edges (SeaweedFS): a rerun after an export whose upload landed but whose
completion marker did not was refused ("already exists") although the object was that
export's own, so the export could never be finished at that key; and an output key with an
empty, "." or ".." segment was not refused as such: "a//m.gguf" loaded the checkpoint, then
uploaded to "a/m.gguf" and marked "a//m.gguf" complete; "a/.." answered "400: Bad Request"
here, and where the store accepts it, "already exists" once the checkpoint had loaded."""

from __future__ import annotations

import pytest

from raylm import storage
from raylm.config import S3Config
from raylm.errors import ConfigError, StorageError
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


def _objects(prefix: str) -> list[str]:
    return sorted(f.uri for f in storage.list_files(prefix))


@pytest.mark.parametrize("cut", ["marker", "upload"])
def test_s3_gguf_rerun_finishes_a_cut_export(s3_server, s3_prefix, tiny_run, tmp_path, cut):
    gguf = pytest.importorskip("gguf")
    from raylm.export.gguf import MARKER_SUFFIX, export_run_gguf

    out = f"{s3_prefix}/models/m.gguf"
    with TcpProxy(s3_server.endpoint) as proxy:
        s3 = S3Config(endpoint_url=proxy.url, max_attempts=1)
        # marker: the upload lands, the marker's PUT never does; upload: the object's PUT dies
        # halfway (path-style request lines).
        target = out + MARKER_SUFFIX if cut == "marker" else out + " "
        proxy.cut(f"PUT /{target[len('s3://'):]}".encode(), after_bytes=0 if cut == "marker" else 4096)
        with pytest.raises(StorageError, match="raylm_export|Connection"):
            export_run_gguf(tiny_run, out, s3)
    # The object is whole or absent (readers know no marker), and never marked complete.
    assert storage.exists(out) == (cut == "marker") and not storage.exists(out + MARKER_SUFFIX)

    assert export_run_gguf(tiny_run, out) == out  # the rerun finishes it
    assert _objects(s3_prefix) == [out, out + MARKER_SUFFIX]
    path = tmp_path / "m.gguf"
    path.write_bytes(storage.read_bytes(out))
    assert "token_embd.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("key", ["models/..", "models/.", "models/../m.gguf", "models//m.gguf", "./m.gguf"])
def test_s3_gguf_export_refuses_odd_keys_before_loading(s3_server, s3_prefix, monkeypatch, tmp_path, key):
    pytest.importorskip("gguf")
    import raylm.generate
    from raylm.export.gguf import export_run_gguf

    def no_load(uri, s3=None):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(raylm.generate, "load_for_inference", no_load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="path segment") as e:
        export_run_gguf(f"{s3_prefix}/run", f"{s3_prefix}/{key}")
    assert "\n" not in str(e.value)
    assert _objects(s3_prefix) == [] and list(tmp_path.iterdir()) == []
