"""A prepared dataset's shards as training reads them (`training_dataset`): a damaged shard, or
one that no longer holds what its manifest entry names, is a DataError naming the shard, not
pyarrow's traceback naming no file (or, for a short shard, an error only once training has run
an epoch). Ray Data's constructors are stubbed: no cluster starts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from raylm import data
from raylm.data import DataError, training_dataset
from raylm.packing import blocks_table

SEQ = 7


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(ray.data, "from_blocks", lambda tables: ("from_blocks", tables))
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kw: ("read_parquet", paths))


@pytest.fixture(params=["in memory", "streamed"])
def path(request, monkeypatch):
    if request.param == "streamed":
        monkeypatch.setattr(data, "IN_MEMORY_BYTES", 0)
    return request.param


def _dataset(tmp_path, rows=(3, 2), table=None):
    shards = []
    for i, n in enumerate(rows):
        name = f"attempt-x/train/shard-{i:05d}.parquet"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        t = table if table is not None else blocks_table([np.arange(SEQ + 1, dtype=np.int32) + r for r in range(n)],
                                                          SEQ + 1)
        pq.write_table(t, tmp_path / name)
        shards.append({"path": name, "rows": n})
    return {"seq_len": SEQ, "train": {"blocks": sum(rows), "shards": shards}}


def test_intact_shards_are_read(tmp_path, path):
    manifest = _dataset(tmp_path)
    kind, got = training_dataset(str(tmp_path), manifest, "train")
    assert kind == ("from_blocks" if path == "in memory" else "read_parquet")
    if kind == "from_blocks":
        assert [t.num_rows for t in got] == [3, 2]


def test_a_truncated_shard_is_named(tmp_path, path):
    manifest = _dataset(tmp_path)
    shard = tmp_path / manifest["train"]["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"^{shard}: damaged shard of a prepared dataset \(.*\); prepare the dataset "
                                        r"again"):
        training_dataset(str(tmp_path), manifest, "train")


def test_a_shard_with_other_rows_than_its_manifest_entry_is_named(tmp_path, path):
    manifest = _dataset(tmp_path)
    manifest["train"]["shards"][0]["rows"] = 4
    manifest["train"]["blocks"] = 6
    shard = tmp_path / manifest["train"]["shards"][0]["path"]
    with pytest.raises(DataError, match=rf"^{shard}: 3 rows, but the manifest names 4; the shard was changed"):
        training_dataset(str(tmp_path), manifest, "train")


def test_a_shard_without_the_column_is_named(tmp_path, path):
    manifest = _dataset(tmp_path, rows=(2,), table=pa.table({"text": ["a", "b"]}))
    shard = tmp_path / manifest["train"]["shards"][0]["path"]
    with pytest.raises(DataError, match=rf"^{shard}: "):
        training_dataset(str(tmp_path), manifest, "train")
