"""How s3:// URIs with empty segments are split into bucket and key (no server needed)."""

import pytest

from raylm import storage


@pytest.mark.parametrize("uri", ["s3://b/runs//x", "s3://b//runs//x/", "s3://b/runs///x//"])
def test_an_empty_segment_inside_a_key_is_dropped_for_every_client(uri):
    """`s3://b/runs//x` gave pyarrow the path `b/runs//x`, which it refuses (ArrowInvalid, a
    traceback), and boto3 the key `runs//x`, which servers such as SeaweedFS store as `runs/x`:
    a run there never found its own checkpoints."""
    assert storage._split_s3(uri) == ("b", "runs/x")
    assert storage.filesystem(uri)[1] == "b/runs/x"
    assert storage.relative("s3://b/runs/x/ckpt-00000001/COMMITTED", uri) == "ckpt-00000001/COMMITTED"
    assert storage.relative(uri.rstrip("/") + "/ckpt-00000001", "s3://b/runs/x") == "ckpt-00000001"
    assert storage.parent(uri.rstrip("/") + "//ckpt-00000001") == "s3://b/runs/x"
