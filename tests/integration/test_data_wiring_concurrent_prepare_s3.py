"""Two `raylm data prepare` runs into one s3:// dataset prefix at once: the one that finished first
removed the other's attempt, and the other then committed a manifest naming its removed shards
(and removed the first one's in turn), so no dataset was left. The check that refuses to commit
must list the attempt's shards on object storage as well. The corpus is small enough to prepare
in this process (no Ray)."""

from __future__ import annotations

import json

import pytest

import raylm.data as data
from raylm import storage
from raylm.config import load_config
from raylm.data import DataError, prepare

pytestmark = pytest.mark.integration


def test_a_prepare_whose_shards_another_removed_does_not_commit_on_s3(tmp_path, s3_prefix, monkeypatch):
    from raylm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i:02d}.txt").write_text(f"note {i}\n" + f"some words {i} here and there\n" * 20)
    tok = train_tokenizer([(corpus / "f00.txt").read_text() * 5], str(tmp_path / "tok"), vocab_size=300)
    out = f"{s3_prefix}/data"
    cfg = load_config(overrides=[f"data.path={corpus}", "data.seq_len=16", "data.dedup=none",
                                 "data.val_fraction=0.2", "data.blocks_per_shard=8"]).data
    # Not racing: a prepare alone commits, and its check lists its own shards on S3.
    alone = prepare(cfg, tok, f"{s3_prefix}/alone", seed=0, log=lambda *_: None)
    assert alone["train"]["shards"]

    real_datacard = data.datacard
    calls = []

    def datacard_running_another(manifest):
        calls.append(1)
        if len(calls) == 1:  # the first prepare has written all its shards: a second one runs whole now
            prepare(cfg, tok, out, seed=1, log=lambda *_: None)
        return real_datacard(manifest)

    monkeypatch.setattr(data, "datacard", datacard_running_another)
    with pytest.raises(DataError, match="another"):
        prepare(cfg, tok, out, seed=0, log=lambda *_: None)
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["seed"] == 1
    for split in ("train", "val"):
        for s in manifest[split]["shards"]:
            assert storage.exists(f"{out}/{s['path']}"), s["path"]
