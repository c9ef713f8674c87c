"""A local HF export never replaces what appeared at its output directory while it ran.

The finished temporary directory used to be renamed onto `out`: an empty directory made there
meanwhile was silently replaced, and a file, a non-empty directory or a link gave a bare
OSError traceback. Now each is kept and the export refused in one line naming `out`.
"""

import os

import pytest

import raylm.export.hf as export_mod
from raylm.errors import OutputExistsError


def _appear(kind: str, out):
    if kind == "file":
        out.write_text("another export")
    elif kind == "directory":
        out.mkdir()
        (out / "config.json").write_text("another export")
    elif kind == "empty directory":
        out.mkdir()
    else:  # a link to nothing
        out.symlink_to(out.parent / "missing")


def _kept(kind: str, out) -> bool:
    if kind == "file":
        return out.read_text() == "another export"
    if kind == "directory":
        return os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "another export"
    if kind == "empty directory":
        return out.is_dir() and not out.is_symlink() and os.listdir(out) == []
    return out.is_symlink() and os.readlink(out) == str(out.parent / "missing")


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "no-renameat2"])
@pytest.mark.parametrize("kind", ["file", "directory", "empty directory", "link"])
def test_what_appears_during_the_export_is_kept(tiny_run, tmp_path, monkeypatch, kind, noreplace):
    out = tmp_path / "hf"
    real = export_mod._write_all

    def write_then_appear(*args, **kwargs):
        result = real(*args, **kwargs)
        _appear(kind, out)
        return result

    monkeypatch.setattr(export_mod, "_write_all", write_then_appear)
    if not noreplace:  # a C library or filesystem without renameat2: the check and the rename
        monkeypatch.setattr(export_mod, "_rename_noreplace", lambda src, dst: False)
    with pytest.raises(OutputExistsError, match="appeared during the export") as e:
        export_mod.export_run(tiny_run, str(out))
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    assert _kept(kind, out)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left behind


def test_the_export_is_placed_whole(tiny_run, tmp_path):
    out = tmp_path / "hf"
    assert export_mod.export_run(tiny_run, str(out)) == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert (out / export_mod.EXPORT_MARKER).is_file() and (out / export_mod.WEIGHTS).is_file()
    assert (out.stat().st_mode & 0o777) == 0o755
