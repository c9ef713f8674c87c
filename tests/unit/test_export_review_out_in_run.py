"""An export into the directory of the run it exports is refused, before the load.

Such an export was written, then lost: the run deletes what it owns in its directory as it
trains on (checkpoint retention removes `ckpt-N/` whole, an export inside it with it, and
any `ckpt-N` older than the newest complete checkpoint at once; a restarted run removes its
`eval/ckpt-N/` results and `report/`), with no word to the user."""

import shutil

import pytest

from raylm import checkpoint
from raylm.errors import ConfigError
from raylm.export.hf import export_run


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the tiny run (the session's run is read-only)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.mark.parametrize("where", ["ckpt-00000200/hf", "ckpt-00000100", "eval/ckpt-00000200/hf", "hf"])
@pytest.mark.parametrize("src", ["run", "ckpt"])
def test_an_hf_export_inside_the_run_is_refused(run, where, src):
    """`raylm export RUN --out RUN/ckpt-00000100` (or inside a checkpoint) was written, and
    the run's next checkpoint removed it by retention. Named by the run or by its checkpoint."""
    source = str(run) if src == "run" else str(run / "ckpt-00000200")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run(source, str(run / where))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_gguf_export_inside_a_checkpoint_is_refused(run):
    pytest.importorskip("gguf")
    from raylm.export.gguf import export_run_gguf

    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run_gguf(str(run), str(run / "ckpt-00000200" / "model.gguf"))
    assert not (run / "ckpt-00000200" / "model.gguf").exists()


def test_an_export_beside_the_run_is_written_and_kept_by_retention(run, tmp_path):
    """The same run's retention leaves an export outside the run alone."""
    out = tmp_path / "hf"
    export_run(str(run), str(out))
    shutil.copytree(run / "ckpt-00000200", run / "ckpt-00000400")
    checkpoint.apply_retention(str(run), 1)
    assert (out / "raylm_export.json").is_file()


def test_a_link_to_the_run_is_seen_through(run, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run(str(run), str(link / "ckpt-00000200" / "hf"))


@pytest.mark.parametrize("src, out", [
    ("s3://b/runs/x", "s3://b/runs/x/ckpt-00000200/hf"),
    ("s3://b/runs/x/ckpt-00000200/", "s3://b/runs/x/hf"),
    ("s3://b/runs/x", "s3://b//runs/x/eval/hf"),
])
def test_an_s3_export_inside_the_run_is_refused_from_the_names_alone(src, out):
    """The same on object storage, told from the URIs before any request is sent."""
    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run(src, out)


@pytest.mark.parametrize("out", ["s3://b/runs/x-hf", "s3://b/runs/hf"])
def test_an_s3_export_beside_the_run_is_not_refused_for_it(out, monkeypatch):
    import raylm.export.hf as export_mod

    def stop(*args, **kwargs):
        raise RuntimeError("past the check")

    monkeypatch.setattr(export_mod, "_clear_failed_upload", stop)
    with pytest.raises(RuntimeError, match="past the check"):
        export_run("s3://b/runs/x", out)
