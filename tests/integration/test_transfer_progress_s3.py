"""A checkpoint-sized copy to and from S3 reports its bytes to stderr: parts uploaded by
s3transfer's threads and files fetched in parallel each counted once, and no credentials."""

import os

import pytest

from raylm import storage
from raylm.progress import to_stderr

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("s3_server")]

# One file over s3transfer's 8 MB multipart threshold (its parts go up on several threads)
# and a few small ones (downloads fetch several files at once).
SIZES = {"model.bin": 9_000_000, "a.json": 400_000, "sub/b.bin": 300_000, "c.txt": 300_000}


def test_s3_upload_and_download_report_progress(tmp_path, s3_prefix, s3_server, capsys):
    src = tmp_path / "src"
    for name, size in SIZES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(size))
    uri = storage.join(s3_prefix, "ckpt-00000010")

    storage.upload_dir(str(src), uri, log=to_stderr, min_bytes=0, every_s=0)
    storage.download_dir(uri, str(tmp_path / "dst"), log=to_stderr, min_bytes=0, every_s=0)
    out, err = capsys.readouterr()

    assert out == ""
    ups = [line for line in err.splitlines() if line.startswith(f"upload {uri} ")]
    downs = [line for line in err.splitlines() if line.startswith(f"download {uri} ")]
    assert ups and downs, err
    assert "100% 10.0/10.0 MB" in ups[-1] and "100% 10.0/10.0 MB" in downs[-1], (ups[-1], downs[-1])
    assert s3_server.secret_key not in err and s3_server.access_key not in err
    for name in SIZES:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()

    # The same copies, small against the default threshold: silent.
    storage.upload_dir(str(src), storage.join(s3_prefix, "again"), log=to_stderr)
    storage.download_dir(uri, str(tmp_path / "dst2"), log=to_stderr)
    assert capsys.readouterr() == ("", "")


def test_a_checkpoint_loaded_from_s3_reports_its_bytes(tiny_run, s3_prefix, s3_server, capsys, monkeypatch):
    """`raylm generate`, `serve` and `export` of an s3:// run read the checkpoint's shards
    straight from storage (RangedReader): past the threshold (0 here), rank 0 says how far."""
    from raylm.checkpoint import RangedReader
    from raylm.generate import load_for_inference

    run = storage.join(s3_prefix, "run")
    storage.upload_dir(str(tiny_run), run)
    monkeypatch.setattr(RangedReader, "progress_min_bytes", 0)
    monkeypatch.setattr(RangedReader, "progress_every_s", 0)
    load_for_inference(run)
    out, err = capsys.readouterr()
    loads = [line for line in err.splitlines() if line.startswith(f"load {run}/ckpt-00000200 ")]
    assert out == "" and loads and "100%" in loads[-1], err
    assert s3_server.secret_key not in err

