"""Copies of large trees (a checkpoint to or from the run's storage) report their progress
to stderr, never credentials; small ones print nothing."""

import os

import pytest

from raylm import storage
from raylm.progress import to_stderr

SIZES = {"a.bin": 300_000, "sub/b.bin": 500_000, "c.bin": 200_000}
TOTAL = sum(SIZES.values())


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    for name, size in SIZES.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return src


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("what", ["download", "upload"])
def test_a_copy_reports_its_bytes_to_stderr(tree, tmp_path, capsys, what):
    dst = tmp_path / "dst"
    copy = storage.download_dir if what == "download" else storage.upload_dir
    copy(str(tree), str(dst), log=to_stderr, min_bytes=0, every_s=0)
    out, err = capsys.readouterr()
    assert out == ""
    got = lines(err)
    label = tree if what == "download" else dst  # the storage side's URI
    assert got and all(line.startswith(f"{what} {label} ") for line in got), err
    assert "100% 1.0/1.0 MB" in got[-1], got[-1]  # every byte counted once
    assert (dst / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()


def test_small_transfers_print_nothing_by_default(tree, tmp_path, capsys):
    storage.download_dir(str(tree), str(tmp_path / "d1"), log=to_stderr, every_s=0)  # 1 MB < the threshold
    storage.upload_dir(str(tree), str(tmp_path / "u1"), log=to_stderr, every_s=0)
    storage.download_dir(str(tree), str(tmp_path / "d2"), min_bytes=0, every_s=0)  # no log: silent
    storage.upload_tree(str(tree), str(tmp_path / "u2"), min_bytes=0, every_s=0)
    assert capsys.readouterr() == ("", "")
    assert storage.PROGRESS_MIN_BYTES >= 100 << 20


def test_progress_label_carries_no_credentials(capsys):
    meter = storage._meter("download", "s3://AKIDUSER:s3cr3tpass@bucket/run/ckpt-00000010", 10,
                           to_stderr, min_bytes=0, every_s=0)
    meter.add(4)
    meter.close()
    err = capsys.readouterr().err
    assert "download s3://***@bucket/run/ckpt-00000010" in err, err
    assert "s3cr3tpass" not in err and "AKIDUSER" not in err
