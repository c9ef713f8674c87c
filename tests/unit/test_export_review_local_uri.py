"""A local export output is read as raylm's storage layer reads a local path.

`raylm export RUN --out file:///data/exports/x` (raylm reads `file://` runs, storage roots and
recipes' roots) wrote the export to `./file:/data/exports/x` under the working directory and
printed `file:/data/...`; `--out '~/x'` wrote `./~/x`; an unsupported scheme (`gs://b/x`)
became a local directory `./gs:/b/x`, all without a word."""

import pytest

from raylm.errors import UserError
from raylm.export.hf import EXPORT_MARKER, export_run


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_a_file_uri_output_is_the_local_path(tiny_run, tmp_path, cwd):
    out = tmp_path / "hf"
    assert export_run(tiny_run, f"file://{out}") == str(out)
    assert (out / EXPORT_MARKER).is_file()
    assert list(cwd.iterdir()) == []


def test_a_file_uri_gguf_output_is_the_local_path(tiny_run, tmp_path, cwd):
    pytest.importorskip("gguf")
    from raylm.export.gguf import export_run_gguf

    out = tmp_path / "m.gguf"
    assert export_run_gguf(tiny_run, f"file://{out}") == str(out)
    assert out.is_file()
    assert list(cwd.iterdir()) == []


def test_a_home_relative_output_is_under_home(tiny_run, tmp_path, cwd, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    export_run(tiny_run, "~/hf")
    assert (home / "hf" / EXPORT_MARKER).is_file()
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_an_unsupported_scheme_is_one_line_and_writes_nothing(tiny_run, cwd, fmt):
    if fmt == "gguf":
        pytest.importorskip("gguf")
        from raylm.export.gguf import export_run_gguf as export
    else:
        export = export_run
    with pytest.raises(UserError, match="unsupported scheme"):
        export(tiny_run, "gs://bucket/model" + (".gguf" if fmt == "gguf" else ""))
    assert list(cwd.iterdir()) == []


def test_a_relative_output_stays_as_written(tiny_run, cwd):
    assert export_run(tiny_run, "exported/hf") == "exported/hf"
    assert (cwd / "exported" / "hf" / EXPORT_MARKER).is_file()
