"""Checkpoint mistakes and damage end in one line naming the path, and only a checkpoint that
raylm committed under its own name counts as complete (raylm.checkpoint)."""

import os

import pytest
import torch

from raylm import checkpoint
from raylm.config import ModelConfig, TrainConfig
from raylm.errors import CheckpointError, PathNotFoundError
from raylm.generate import resolve_checkpoint
from raylm.model import build_model
from raylm.train import make_optimizer
from tests.unit.test_checkpoint import CFG, saved


def _one_line(excinfo, *fragments: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_a_file_given_as_a_run_directory_holds_no_checkpoints(tmp_path):
    """`raylm generate runs/x/record.json` (or `sft --from` a file): listing a file as a run
    raised a bare ValueError ('... is not under ...') from the path arithmetic."""
    saved(tmp_path)
    record = tmp_path / "record.json"
    record.write_text("{}")
    assert checkpoint.list_checkpoints(str(record)) == []
    assert checkpoint.latest_complete(str(record)) is None
    with pytest.raises(PathNotFoundError) as info:
        resolve_checkpoint(str(record))
    _one_line(info, str(record), "no complete checkpoint")


def test_a_meta_json_that_is_not_utf8_is_a_one_line_error(tmp_path):
    """A damaged meta.json (bytes that are not UTF-8) failed with UnicodeDecodeError's
    traceback: the text was decoded before the JSON parse that turns errors into one line."""
    _, _, uri = saved(tmp_path)
    with open(os.path.join(uri, checkpoint.META), "wb") as f:
        f.write(b"\x80\x81\x82 not json")
    with pytest.raises(CheckpointError) as info:
        checkpoint.read_meta(uri)
    _one_line(info, os.path.join(uri, checkpoint.META))


@pytest.mark.parametrize("loader", ["load", "load_model_weights", "SafeReader"])
def test_a_commit_marker_that_is_not_utf8_is_a_one_line_error(tmp_path, loader):
    _, _, uri = saved(tmp_path)
    with open(os.path.join(uri, checkpoint.COMMIT_MARKER), "wb") as f:
        f.write(b"\xff\x80\x00garbage")
    model = build_model(CFG, seed=3)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    with pytest.raises(CheckpointError) as info:
        if loader == "load":
            checkpoint.load(model, opt, uri)
        elif loader == "load_model_weights":
            checkpoint.load_model_weights(model, uri)
        else:
            checkpoint.SafeReader(uri)
    _one_line(info, os.path.join(uri, checkpoint.COMMIT_MARKER))


def test_another_name_for_the_same_step_does_not_complete_an_unfinished_checkpoint(tmp_path):
    """`ckpt-1/COMMITTED` and the unfinished `ckpt-00000001/` parse to the same step; the
    marker of one made the other count as complete, and resume would load the cut one."""
    saved(tmp_path, step=1, commit=False)  # its upload "was cut": no marker
    other = tmp_path / "ckpt-1"
    other.mkdir()
    (other / checkpoint.COMMIT_MARKER).write_text('{"step": 1}')
    assert checkpoint.latest_complete(str(tmp_path)) is None
    assert [(s, d) for s, _, d in checkpoint.list_checkpoints(str(tmp_path))] == [(1, False)]
    # Steps past 8 digits keep their full name.
    big = checkpoint.checkpoint_name(123456789)
    (tmp_path / big).mkdir()
    (tmp_path / big / checkpoint.COMMIT_MARKER).write_text('{"step": 123456789}')
    assert checkpoint.latest_complete(str(tmp_path)).endswith(big)


@pytest.mark.parametrize("other", [dict(dim=64), dict(n_layers=2)], ids=["wider", "deeper"])
@pytest.mark.parametrize("loader", ["load", "load_model_weights"])
def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path, other, loader):
    """DCP's planner raised a bare ValueError (size mismatch) or RuntimeError (missing key)."""
    _, _, uri = saved(tmp_path)
    cfg = ModelConfig(**{**dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16), **other})
    model = build_model(cfg, seed=3)
    with pytest.raises(CheckpointError) as info:
        if loader == "load":
            checkpoint.load(model, make_optimizer(model, TrainConfig(), torch.device("cpu")), uri)
        else:
            checkpoint.load_model_weights(model, uri)
    _one_line(info, uri, "does not fit this model")


def test_a_checkpoints_entry_in_the_run_directory_is_flushed_before_retention(tmp_path, monkeypatch):
    """The marker's rename was flushed (its directory fsynced), but not the checkpoint
    directory's own entry in the run directory; retention then deletes older checkpoints, and
    POSIX lets a crash keep those deletions while losing the new directory: no complete
    checkpoint left. The run directory is flushed at the commit, before retention runs."""
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    run = tmp_path / "run"
    run.mkdir()
    _, _, uri = saved(run, commit=False)
    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.commit(uri, {"step": 1}, files=checkpoint.file_digests(uri))
    assert os.path.realpath(run) in events


def test_storage_that_cannot_be_reached_is_not_called_an_incomplete_checkpoint(monkeypatch):
    """Any storage error reading the marker became 'no COMMITTED marker; an incomplete
    checkpoint is never loaded', hiding an unreachable endpoint or denied access."""
    from raylm import storage
    from raylm.config import S3Config
    from raylm.errors import StorageError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage.clear_cache()
    s3 = S3Config(endpoint_url="http://127.0.0.1:9", max_attempts=1)  # the discard port: nothing listens
    try:
        with pytest.raises(StorageError) as info:
            checkpoint.load_model_weights(build_model(CFG, seed=1), "s3://bucket/run/ckpt-00000001", s3)
    finally:
        storage.clear_cache()
    _one_line(info, "s3://bucket/run/ckpt-00000001/COMMITTED", "cannot reach")


def test_a_missing_marker_still_says_so(tmp_path):
    _, _, uri = saved(tmp_path, commit=False)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_model_weights(build_model(CFG, seed=1), uri)
    _one_line(info, uri, "no COMMITTED marker")
