"""A run whose s3:// path has an empty segment inside it (`s3://bucket/runs//x`, as
`$PREFIX/$RUN` gives with PREFIX ending in '/')."""

import pytest
import torch
import torch.nn as nn

from raylm import checkpoint, storage
from raylm.storage import join

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("s3_server")]


def test_a_run_with_an_empty_segment_in_its_key_finds_and_loads_its_checkpoints(s3_prefix, tmp_path):
    """boto3 sent the key `runs//x/...` as it was (SeaweedFS and MinIO store it as `runs/x/...`)
    and listed the prefix `runs//x`, which found nothing there: the run's checkpoints were never
    found (a resume started from scratch and wrote over them; retention deleted none). Where the
    server kept the key as sent (AWS), pyarrow refused the path outright (`ArrowInvalid: Empty
    path component`), a traceback at the first load."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    run = s3_prefix + "//run"
    for step in (1, 2, 3):
        local = str(tmp_path / f"ckpt{step}")
        checkpoint.write_local(model, optimizer, {"step": step}, local)
        ckpt = join(run, checkpoint.checkpoint_name(step))
        storage.upload_dir(local, ckpt)
        checkpoint.commit(ckpt, {"step": step}, files=checkpoint.file_digests(local))
    assert [(s, d) for s, _, d in checkpoint.list_checkpoints(run)] == [(1, True), (2, True), (3, True)]
    latest = checkpoint.latest_complete(run)
    assert latest == join(run, "ckpt-00000003")
    fresh = nn.Linear(3, 2)
    assert checkpoint.load_model_weights(fresh, latest)["step"] == 3
    assert torch.equal(fresh.weight, model.weight)
    assert checkpoint.apply_retention(run, keep=1) == [join(run, "ckpt-00000001"), join(run, "ckpt-00000002")]
    assert [s for s, _, _ in checkpoint.list_checkpoints(s3_prefix + "/run")] == [3]


def test_an_empty_segment_names_the_same_objects_for_boto3_and_pyarrow(s3_prefix):
    """The same URI named `runs//x/f` to boto3 and was refused by pyarrow (a traceback), so a
    file written by one client could not be read by the other."""
    uri = s3_prefix + "//x//f.bin"
    storage.write_bytes(uri, b"abc")
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        assert f.read() == b"abc"
    assert storage.read_bytes(s3_prefix + "/x/f.bin") == b"abc"
    assert storage.exists(s3_prefix + "//x") and storage.exists(s3_prefix + "/x")
    assert [i.uri for i in storage.list_files(s3_prefix + "//x", pattern=False)] == [s3_prefix + "//x/f.bin"]
    storage.delete(s3_prefix + "//x")
    assert not storage.exists(s3_prefix + "/x")
