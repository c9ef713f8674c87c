"""A GGUF export never replaces a file that appeared at its output while it ran."""

import pytest

pytest.importorskip("gguf")

import raylm.export.gguf as export_mod  # noqa: E402
from raylm.errors import OutputExistsError  # noqa: E402


def test_a_file_that_appears_during_the_export_is_kept(tiny_run, tmp_path, monkeypatch):
    """Another export to the same path finishing first: its output is kept and this one is
    refused in one line, leaving no temporary behind (a rename replaced it silently)."""
    out = tmp_path / "m.gguf"
    real = export_mod._write

    def write_then_other(*args, **kwargs):
        real(*args, **kwargs)
        out.write_bytes(b"another export")

    monkeypatch.setattr(export_mod, "_write", write_then_other)
    with pytest.raises(OutputExistsError, match="appeared during the export"):
        export_mod.export_run_gguf(tiny_run, str(out))
    assert out.read_bytes() == b"another export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_the_file_is_placed_whole_and_readable(tiny_run, tmp_path):
    import gguf

    out = tmp_path / "m.gguf"
    assert export_mod.export_run_gguf(tiny_run, str(out)) == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert (out.stat().st_mode & 0o777) == 0o644
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
