"""raylm.storage on local paths and URI spellings: a file where a directory must go is named,
and an `s3://` path is under the same path however its key's slashes are written."""

import pytest

from raylm import storage
from raylm.storage import StorageError


def test_a_file_where_a_directory_must_go_is_named(tmp_path):
    """`storage=<a file>` or a write below a file said only `<path>: File exists`."""
    (tmp_path / "f").write_text("f")
    with pytest.raises(StorageError) as e:
        storage.write_bytes(str(tmp_path / "f" / "x"), b"1")
    assert str(e.value) == f"{tmp_path}/f/x: {tmp_path}/f is a file, not a directory"
    with pytest.raises(StorageError) as e:
        storage.makedirs(str(tmp_path / "f"))
    assert str(e.value) == f"{tmp_path}/f: {tmp_path}/f is a file, not a directory"
    from raylm import run_lock
    with pytest.raises(StorageError, match=r"/f is a file, not a directory$"):
        with run_lock.held(str(tmp_path / "f")):
            pass


@pytest.mark.parametrize("base", ["s3://b//runs/x", "s3://b///runs/x/", "s3://b/runs/x//"])
def test_an_s3_path_is_under_its_base_however_the_slashes_are_written(base):
    """Every request sends `runs/x` for these; `relative` refused `s3://b/runs/x/...` (as
    listings name the files) as not under `s3://b//runs/x`."""
    assert storage.relative("s3://b/runs/x/ckpt-00000001/COMMITTED", base) == "ckpt-00000001/COMMITTED"
    assert storage.relative("s3://b//runs/x/ckpt-00000001", base) == "ckpt-00000001"
    with pytest.raises(ValueError):
        storage.relative("s3://b/runs/x2/ckpt-00000001", base)
    with pytest.raises(ValueError):
        storage.relative("s3://b/runs/x", base)


def test_the_run_lock_never_writes_through_a_link_planted_in_its_place(tmp_path):
    """In a run directory others can write to, `.raylm.lock -> ~/some-file` made the lock open
    the file it names, empty it and write the holder's pid there."""
    from raylm import run_lock

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"a file of the user's own\n")
    run = tmp_path / "runs" / "shared"
    run.mkdir(parents=True)
    (run / run_lock.RUN_LOCK).symlink_to(victim)
    with pytest.raises(StorageError) as e:
        with run_lock.held(str(run)):
            pass
    assert str(e.value) == (f"{run}/{run_lock.RUN_LOCK}: a link where the run's lock file goes, which raylm "
                            f"never writes through (remove the link)")
    assert victim.read_bytes() == b"a file of the user's own\n"
    assert (run / run_lock.RUN_LOCK).is_symlink()  # left for its owner to see


def test_the_run_lock_refuses_a_pipe_in_its_place(tmp_path):
    import os

    from raylm import run_lock

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / run_lock.RUN_LOCK)
    with pytest.raises(StorageError, match=r"/run/\.raylm\.lock: not a regular file where the run's lock file goes"):
        with run_lock.held(str(run)):
            pass
