"""A local export output that cannot be written is refused before the checkpoint loads.

Loading a big model takes minutes; an existing output directory or file, a path under a
file, an invalid option (shard size, GGUF dtype) or a GGUF path naming a directory was
refused only after that load. (The s3:// GGUF output was already checked first.) The load
stands in here as a function that fails the test if it is called.
"""

from __future__ import annotations

import os

import pytest

import raylm.generate
from raylm.errors import ConfigError, OutputExistsError
from raylm.export.gguf import export_run_gguf
from raylm.export.hf import export_run


@pytest.fixture(autouse=True)
def no_load(monkeypatch):
    def load(uri, s3=None):
        raise AssertionError(f"the checkpoint {uri} was loaded before the output was refused")

    monkeypatch.setattr(raylm.generate, "load_for_inference", load)


def _hf(run, out, **kw):
    return export_run(run, out, **kw)


def _gguf(run, out, **kw):
    return export_run_gguf(run, out, **kw)


@pytest.mark.parametrize("export, name", [(_hf, "hf"), (_gguf, "m.gguf")])
@pytest.mark.parametrize("existing", ["dir", "file", "dangling link"])
def test_an_existing_local_output_is_refused_before_the_load(tmp_path, export, name, existing):
    out = tmp_path / name
    if existing == "dir":
        out.mkdir()
    elif existing == "file":
        out.write_text("mine")
    else:
        os.symlink(tmp_path / "nowhere", out)  # a rename would replace the link
    with pytest.raises(OutputExistsError, match=f"^{out}: already exists"):
        export(str(tmp_path / "run"), str(out))
    assert os.path.lexists(out) and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("export, name", [(_hf, "hf"), (_gguf, "m.gguf")])
def test_an_output_under_a_file_is_refused_before_the_load(tmp_path, export, name):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "sub" / name
    with pytest.raises(ConfigError, match=f"^{out}: {tmp_path / 'notes.txt'} is not a directory"):
        export(str(tmp_path / "run"), str(out))


def test_invalid_options_are_refused_before_the_load(tmp_path):
    with pytest.raises(ConfigError, match="^max_shard_bytes=0: must be positive$"):
        export_run(str(tmp_path / "run"), str(tmp_path / "hf"), max_shard_bytes=0)
    with pytest.raises(ConfigError, match="export dtype 'int4'"):
        export_run(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="int4")
    with pytest.raises(ConfigError, match="GGUF export dtype 'q4_0'"):
        export_run_gguf(str(tmp_path / "run"), str(tmp_path / "m.gguf"), dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_path_naming_a_directory_is_refused(tmp_path):
    """`--out export/` wrote a file named `export` (Path drops the slash); it is one file, and
    the path must name it, as an s3:// key must."""
    with pytest.raises(ConfigError, match="a GGUF export is one file; name it, e.g. .*/export/model.gguf$"):
        export_run_gguf(str(tmp_path / "run"), f"{tmp_path}/export/")
    assert list(tmp_path.iterdir()) == []
