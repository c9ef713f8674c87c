"""Two `raylm data prepare` runs into one directory at once: the one that finished first removed
the other's attempt (an unfinished attempt is stale to it), and the other then committed a
manifest naming its removed shards, and removed the first one's in turn: neither dataset was
left, and the manifest a later `pretrain` read named files that were gone."""

from __future__ import annotations

import json
import os

import pytest

import raylm.data as data
from raylm.config import load_config
from raylm.data import DataError, prepare


def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i:02d}.txt").write_text(f"note {i}\n" + f"some words {i} here and there\n" * 20)
    return corpus


def test_a_prepare_whose_shards_another_removed_does_not_commit(tmp_path, monkeypatch):
    from raylm.tokenizer import train_tokenizer

    corpus = _corpus(tmp_path)
    tok = train_tokenizer([(corpus / "f00.txt").read_text() * 5], str(tmp_path / "tok"), vocab_size=300)
    monkeypatch.chdir(tmp_path)
    out = "./out"  # as a user writes it on the command line: the check must see its shards all the same

    def cfg(min_chars):
        return load_config(overrides=[f"data.path={corpus}", "data.seq_len=16", "data.dedup=none",
                                      "data.val_fraction=0.2", "data.blocks_per_shard=8",
                                      f"data.min_chars={min_chars}"]).data

    alone = prepare(cfg(1), tok, "alone/", seed=0, log=lambda *_: None)  # not racing: it commits
    assert alone["train"]["shards"] and (tmp_path / "alone" / "manifest.json").exists()

    real_datacard = data.datacard
    calls = []

    def datacard_running_another(manifest):
        calls.append(1)
        if len(calls) == 1:  # the first prepare has written all its shards: a second one runs whole now
            prepare(cfg(2), tok, out, seed=1, log=lambda *_: None)
        return real_datacard(manifest)

    monkeypatch.setattr(data, "datacard", datacard_running_another)
    with pytest.raises(DataError, match="another"):
        prepare(cfg(1), tok, out, seed=0, log=lambda *_: None)
    # The second prepare's dataset is whole: every shard its manifest names exists.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["seed"] == 1
    for split in ("train", "val"):
        for s in manifest[split]["shards"]:
            assert os.path.exists(tmp_path / "out" / s["path"]), s["path"]
