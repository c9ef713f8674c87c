"""Checkpoints on local storage: round trip, commit markers, retention, safe loading."""

import torch

from raylm import checkpoint
from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.train import make_optimizer

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16)


def saved(tmp_path, step=1, commit=True):
    """A real checkpoint of a tiny model and its AdamW state, committed as training commits it."""
    model = build_model(CFG, seed=step)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    opt.step()
    uri = str(tmp_path / checkpoint.checkpoint_name(step))
    checkpoint.write_local(model, opt, {"step": step}, uri)
    if commit:
        checkpoint.commit(uri, {"step": step}, files=checkpoint.file_digests(uri))
    return model, opt, uri


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt, uri = saved(tmp_path)
    fresh = build_model(CFG, seed=99)
    fresh_opt = make_optimizer(fresh, TrainConfig(), torch.device("cpu"))
    assert checkpoint.load(fresh, fresh_opt, uri)["step"] == 1
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def test_only_committed_checkpoints_count_and_retention_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        saved(tmp_path, step, commit=step != 3)  # step 3's upload "was cut": no marker
    run = str(tmp_path)
    assert checkpoint.latest_complete(run).endswith("ckpt-00000002")
    assert checkpoint.apply_retention(run, keep=1) == [str(tmp_path / "ckpt-00000001")]
    assert [(s, d) for s, _, d in checkpoint.list_checkpoints(run)] == [(2, True), (3, False)]


def test_load_keeps_the_callers_optimizer_settings(tmp_path):
    """A resumed run's weight decay and betas are its own config's: the checkpoint brings the
    optimizer's moments, not the settings it was written with."""
    _, opt, uri = saved(tmp_path)
    fresh = build_model(CFG, seed=99)
    fresh_opt = make_optimizer(fresh, TrainConfig(weight_decay=0.0, beta2=0.99), torch.device("cpu"))
    checkpoint.load(fresh, fresh_opt, uri)
    assert [(g["weight_decay"], g["betas"]) for g in fresh_opt.param_groups] == [(0.0, (0.9, 0.99))] * 2
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def test_a_local_checkpoint_is_on_disk_before_its_marker(tmp_path, monkeypatch):
    """Copies and renames reach the disk when the kernel writes them back, perhaps after the
    marker: after a machine's crash, a checkpoint with empty shards then looked complete. Every
    file and directory is flushed before the marker is written, and the marker's rename after."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.realpath(dst)))
        return real_replace(src, dst)

    _, _, uri = saved(tmp_path, commit=False)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.commit(uri, {"step": 1}, files=checkpoint.file_digests(uri))
    marker = os.path.realpath(os.path.join(uri, checkpoint.COMMIT_MARKER))
    renamed = events.index(("rename", marker))
    flushed = {path for kind, path in events[:renamed] if kind == "fsync"}
    files = {os.path.realpath(os.path.join(root, n)) for root, _, names in os.walk(uri) for n in names}
    assert files - {marker} <= flushed and os.path.realpath(uri) in flushed
    assert ("fsync", os.path.realpath(uri)) in events[renamed + 1:]  # the rename itself


def test_retention_removes_a_checkpoints_marker_before_its_files(tmp_path, monkeypatch):
    """Cut short while deleting, retention left a checkpoint that looked complete with its
    shards gone."""
    from raylm import storage

    for step in (1, 2):
        saved(tmp_path, step)
    real = storage.delete

    def delete(uri, s3=None):
        if not uri.endswith(checkpoint.COMMIT_MARKER):
            raise OSError("the machine went down")
        real(uri, s3)

    monkeypatch.setattr(storage, "delete", delete)
    try:
        checkpoint.apply_retention(str(tmp_path), keep=1)
    except OSError:
        pass
    assert [(s, d) for s, _, d in checkpoint.list_checkpoints(str(tmp_path))] == [(1, False), (2, True)]


def test_async_checkpoints_are_flushed_by_the_upload_thread_before_their_marker(tmp_path, monkeypatch):
    """Flushing a large checkpoint takes the disk's time; done at the commit, it stalled the
    training thread that writes the marker. The upload thread flushes the files it copied,
    and the marker still comes after every one of them."""
    import os
    import threading

    import numpy as np

    from raylm.config import load_config
    from raylm.train import train_local

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"), threading.current_thread().name))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.realpath(dst), threading.current_thread().name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cfg = load_config(overrides=[
        f"storage={tmp_path}", "name=run", "model.vocab_size=64", "model.dim=32", "model.n_layers=1",
        "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=100",
        "train.async_checkpoint=true"])
    rows = (np.arange(17)[None, :] * np.arange(1, 13)[:, None] % 64).astype(np.int32)
    train_local(cfg, rows[:8], rows[8:], log=lambda *_: None)
    ckpt = os.path.realpath(tmp_path / "run" / "ckpt-00000002")
    marker = os.path.join(ckpt, checkpoint.COMMIT_MARKER)
    renamed = next(i for i, (kind, path, _) in enumerate(events) if kind == "rename" and path == marker)
    files = {os.path.join(ckpt, n) for n in os.listdir(ckpt)} - {marker}
    by_thread = {path: thread for kind, path, thread in events[:renamed] if kind == "fsync" and path in files}
    assert files and set(by_thread) == files  # every file flushed before the marker
    assert threading.main_thread().name not in by_thread.values()
