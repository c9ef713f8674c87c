"""data.mode=stream: training straight from the raw corpus in S3 sees the very blocks that
prepared shards hold, in the same order, and a worker failure resumes at the next unseen
block (the stream learns its epoch length as it goes, so resume cannot index into it)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from raylm import storage
from raylm.config import load_config
from raylm.data import packed_blocks, stream_datasets, training_dataset
from raylm.generate import load_tokenizer
from tests.small import SMALL

pytestmark = pytest.mark.integration


def prepared_blocks(data_dir, manifest, split, s3) -> np.ndarray:
    batches = training_dataset(data_dir, manifest, split, s3).iter_batches(batch_format="pyarrow", batch_size=None)
    return np.stack(pa.concat_tables(list(batches)).column("tokens").to_numpy(zero_copy_only=False))


def test_stream_yields_the_prepared_blocks_in_order(prepared):
    import ray

    cfg, data_dir, manifest = prepared
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    datasets, streamed = stream_datasets(cfg.data, tok, cfg.seed, cfg.s3, readers=1, log=lambda *_: None)
    assert streamed["mode"] == "stream" and streamed["key"] == manifest["key"]
    for split in ("train", "val"):
        docs = datasets[split].iter_batches(batch_format="pyarrow", batch_size=None)
        got = np.stack([b for _, b, _ in packed_blocks(docs, cfg.data, streamed["eos_id"], streamed["seed"],
                                                        splits=(split,))])
        want = prepared_blocks(data_dir, manifest, split, cfg.s3)
        assert got.shape == want.shape == (manifest[split]["blocks"], cfg.data.seq_len + 1)
        assert np.array_equal(got, want), f"{split}: streamed blocks differ from the prepared shards"


def run(prepared, name: str, mode: str, failure: str | None = None) -> list[tuple]:
    from raylm.pipeline import pretrain

    base, data_dir, _ = prepared
    corpus = base.data.path  # the raw corpus: both modes start from it
    cfg = load_config(overrides=[
        f"storage={base.storage}", f"name={name}", f"data.path={corpus}", f"tokenizer.path={base.tokenizer.path}",
        f"model.vocab_size={base.model.vocab_size}", *SMALL, f"data.mode={mode}", "data.dedup=exact",
        # Synchronous checkpoints: the restart must find step 3's, whatever the upload speed.
        "train.max_steps=8", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=3",
        "train.async_checkpoint=false", "train.timeout_s=300"])
    if failure:
        os.environ["RAYLM_INJECT_FAILURE"] = failure
    try:
        pretrain(cfg, resume="auto", max_failures=1 if failure else 0, samples=False)
    finally:
        os.environ.pop("RAYLM_INJECT_FAILURE", None)
    rows = [json.loads(x) for x in storage.read_text(storage.join(cfg.run_dir, "metrics.jsonl")).splitlines()]
    record = json.loads(storage.read_text(storage.join(cfg.run_dir, "record.json")))
    if mode == "stream":  # nothing was prepared into the run directory
        assert not storage.exists(storage.join(cfg.run_dir, "data"))
        assert record["data"]["mode"] == "stream"
    return [(r["step"], r["loss"], r["consumed_blocks"]) for r in rows if r.get("kind") == "train"]


def test_streamed_training_matches_prepared_and_survives_a_worker_failure(prepared):
    from_shards = run(prepared, "from-shards", "prepare")
    streamed = run(prepared, "streamed", "stream", failure="step=5,rank=1,kind=raise")
    assert [s for s, _, _ in streamed] == list(range(1, 9))
    assert streamed == from_shards  # same blocks, same order, same losses: == not isclose
