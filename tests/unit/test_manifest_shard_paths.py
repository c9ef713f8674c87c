"""A prepared dataset's manifest names its shards by paths inside the dataset; one written by
someone else must not make training read a file elsewhere (`../`, an absolute path)."""

import json

import pytest

from raylm.data import prepared_datasets
from raylm.errors import DataError


@pytest.mark.parametrize("path", ["../private/secret.parquet", "attempt-1/../../private/secret.parquet",
                                  "/private/secret.parquet", "attempt-1//train/shard.parquet", "./x.parquet"])
def test_a_shard_path_outside_the_dataset_is_refused_before_it_is_read(tmp_path, path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.parquet").write_text("the user's own file, not a shard")
    out = tmp_path / "data"
    out.mkdir()
    shard = {"path": path.replace("/private", str(private)) if path.startswith("/") else path, "rows": 1}
    manifest = {"seq_len": 8, "vocab_size": 16, "train": {"blocks": 1, "shards": [shard]},
                "val": {"blocks": 1, "shards": [shard]}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        prepared_datasets(str(out), manifest)
    assert "is not a file inside the dataset" in str(e.value) and "manifest.json" in str(e.value), e.value
