"""A prepared dataset's manifest.json edited by hand (or written by another version) with raylm's
own keys but a field of the wrong shape: `pretrain` on it stopped with a bare KeyError or
TypeError from deep in the data loading ('train', "'<' not supported between 'str' and 'int'"),
naming neither the file nor the field. Now it is one DataError naming both: where it is read
(a field of the wrong type), or at the latest where training opens it (a field left out)."""

from __future__ import annotations

import json

import pytest

from raylm.data import DataError, prepared_datasets, read_manifest

GOOD = {"format_version": 3, "key": "k", "seq_len": 8, "tokenizer_sha256": "ab" * 32,
        "train": {"blocks": 2, "shards": [{"path": "attempt-1/train/shard-00000.parquet", "rows": 2}]},
        "val": {"blocks": 1, "shards": [{"path": "attempt-1/val/shard-00000.parquet", "rows": 1}]}}


def _with(**changes):
    m = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = m
        for p in parents:
            node = node[p] if not p.isdigit() else node[int(p)]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return m


@pytest.mark.parametrize("manifest, field", [
    (_with(train=KeyError), "train"),
    (_with(val=[]), "val"),
    (_with(train__blocks="2"), "train.blocks"),
    (_with(train__shards={"path": "x"}), "train.shards"),
    (_with(train__shards=["attempt-1/train/shard-00000.parquet"]), "train.shards[0]"),
    (_with(val__shards=[{"rows": 1}]), "val.shards[0]"),
    (_with(train__shards=[{"path": "a.parquet", "rows": "2"}]), "train.shards[0].rows"),
    (_with(seq_len="8"), "seq_len"),
    (_with(tokenizer_sha256=KeyError), "tokenizer_sha256"),
    (_with(stats={"bad_records": 3}), "stats.bad_records"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_a_damaged_manifest_is_one_error_naming_the_field(tmp_path, manifest, field, strict):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        prepared_datasets(str(tmp_path), read_manifest(str(tmp_path), strict=strict))
    assert "manifest.json" in str(e.value) and field in str(e.value), e.value


@pytest.mark.parametrize("manifest, field", [
    (_with(train__blocks="2"), "train.blocks"), (_with(val__shards=[{"rows": 1}]), "val.shards[0]"),
    (_with(seq_len=[8]), "seq_len"), (_with(tokenizer_sha256=12), "tokenizer_sha256")])
def test_a_field_of_the_wrong_type_is_refused_where_the_manifest_is_read(tmp_path, manifest, field):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="damaged manifest") as e:
        read_manifest(str(tmp_path), strict=True)
    assert field in str(e.value), e.value


def test_a_whole_manifest_reads_as_it_is(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD))
    assert read_manifest(str(tmp_path), strict=True) == GOOD


def test_a_prepared_data_path_whose_manifest_lacks_train_is_one_line_before_its_fields_are_read(tmp_path):
    """`pretrain data.path=<prepared dir>` reads the manifest's train block count to log it
    (raylm.pipeline.ensure_data): a manifest without `train` was a bare KeyError there."""
    from raylm.config import load_config
    from raylm.pipeline import ensure_data

    (tmp_path / "manifest.json").write_text(json.dumps(_with(train=KeyError)))
    cfg = load_config(overrides=[f"data.path={tmp_path}", f"storage={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match=r"manifest\.json: a damaged manifest \(no train object\)"):
        ensure_data(cfg, tok=None)
