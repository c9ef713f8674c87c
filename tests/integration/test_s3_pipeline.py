"""The pipeline against a real S3 server (SeaweedFS on loopback): corpus read from s3:// by Ray
Data, tokenizer, prepared shards, checkpoints (through Ray Train's storage filesystem), commit
markers, metrics and resume, all in object storage."""

from __future__ import annotations

import json

import pytest

from raylm import checkpoint, storage
from raylm.config import load_config
from raylm.corpus import write_builtin_corpus
from raylm.pipeline import pretrain

pytestmark = pytest.mark.integration

SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "data.seq_len=64",
    "tokenizer.vocab_size=512", "tokenizer.sample_bytes=300000", "train.micro_batch_size=4",
    "train.global_batch_size=8", "train.warmup_steps=2", "train.log_every=2", "train.eval_every=6",
    "train.ckpt_every=6", "train.eval_batches=1", "sample.max_new_tokens=8",
]


def test_pretrain_and_resume_in_object_storage(ray_local, s3_prefix, tmp_path, capfd):
    write_builtin_corpus(str(tmp_path / "corpus"), min_bytes=400_000)
    storage.upload_dir(str(tmp_path / "corpus"), f"{s3_prefix}/corpus")
    common = [f"storage={s3_prefix}/runs", "name=s3run", f"data.path={s3_prefix}/corpus/*.jsonl", *SMALL]

    summary = pretrain(load_config(overrides=[*common, "train.max_steps=6"]))
    run_dir = f"{s3_prefix}/runs/s3run"
    assert summary["val_loss"] > 0
    steps = [(s, done) for s, _, done in checkpoint.list_checkpoints(run_dir)]
    assert steps == [(6, True)]
    manifest = json.loads(storage.read_text(f"{run_dir}/data/manifest.json"))
    assert all(src["uri"].startswith("s3://") and src["etag"] for src in manifest["sources"])
    for name in ("record.json", "metrics.jsonl", "loss.png", "samples.txt", "tokenizer/tokenizer.model"):
        assert storage.exists(f"{run_dir}/{name}"), name

    capfd.readouterr()
    pretrain(load_config(overrides=[*common, "train.max_steps=10"]), resume="must", samples=False)
    assert "resumed from" in capfd.readouterr().out
    assert [s for s, _, done in checkpoint.list_checkpoints(run_dir) if done] == [6, 10]
    rows = [json.loads(x) for x in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8, 10]
