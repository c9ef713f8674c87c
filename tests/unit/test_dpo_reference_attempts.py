"""dpo.precompute_reference writes its rows under an attempt directory and commits them with a
manifest: the shards of an interrupted earlier pass, never named by a manifest, are removed
once a pass commits (as prepared datasets' are), not left in storage for good."""

from __future__ import annotations

import hashlib
import json

import numpy as np

import raylm.posttrain as posttrain
from raylm.config import Config


class _Scored:
    def __init__(self, batch):
        self.batch = batch

    def iter_batches(self, batch_format="numpy", batch_size=None):
        n = len(self.batch["chosen"])
        yield {**self.batch, "ref_chosen_logp": np.full(n, -1.0, np.float32),
               "ref_rejected_logp": np.full(n, -2.0, np.float32)}


class _Rows:
    def __init__(self, n):
        self.batch = {"chosen": np.zeros((n, 8), np.int32), "chosen_mask": np.ones((n, 8), np.int8),
                      "rejected": np.ones((n, 8), np.int32), "rejected_mask": np.ones((n, 8), np.int8)}

    def map_batches(self, fn, **kwargs):  # the reference model's pass, stood in for
        return _Scored(self.batch)


def test_a_committed_reference_pass_removes_an_interrupted_ones_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(posttrain, "prepared_datasets", lambda d, m, s3: {"train": _Rows(3), "val": _Rows(2)})
    manifest = {"key": "data-key", "columns": ["chosen", "chosen_mask", "rejected", "rejected_mask"],
                "row_bytes": 80, "seq_len": 7}
    parent = {"sha256": "p" * 64, "checkpoint": str(tmp_path / "parent")}
    data_dir = tmp_path / "data"
    cfg = Config(storage=str(tmp_path / "runs"))
    # An earlier pass that died after writing a shard: the same reference directory, no manifest.
    key_dir = hashlib.sha256(f"{parent['sha256']}:{manifest['key']}".encode()).hexdigest()[:16]
    stale = data_dir / f"reference-{key_dir}" / "attempt-20260101-000000" / "train" / "shard-00000.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half-written")

    out, new = posttrain.precompute_reference(cfg, str(data_dir), manifest, parent)
    assert out == str(data_dir / f"reference-{key_dir}")
    assert not stale.exists()
    committed = json.loads((data_dir / f"reference-{key_dir}" / "manifest.json").read_text())
    assert committed["train"]["blocks"] == 3 and committed["val"]["blocks"] == 2
    for split in ("train", "val"):
        for shard in committed[split]["shards"]:
            assert (data_dir / f"reference-{key_dir}" / shard["path"]).exists()
    # Run again: the committed pass is reused, untouched.
    assert posttrain.precompute_reference(cfg, str(data_dir), manifest, parent)[1] == committed
