"""A resume that the run's checkpoint refuses is refused before the tokenizer, Ray and the
data stage: before, `raylm pretrain` prepared the run's data/ again (tokenizing the corpus,
under the refused settings) and only then refused."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from raylm import pipeline
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.pipeline import absolute_paths, ensure_data, ensure_tokenizer, pretrain
from raylm.train import train_local

RUN = ["name=r", "data.seq_len=32", "data.dedup=none", "data.val_fraction=0.1", "data.min_chars=1",
       "tokenizer.vocab_size=300", "tokenizer.sample_bytes=100000", "model.dim=32", "model.n_layers=1",
       "model.n_heads=2", "model.max_seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
       "train.num_workers=1", "train.warmup_steps=0", "train.max_steps=1", "train.ckpt_every=1",
       "train.eval_every=1", "train.eval_batches=1", "train.async_checkpoint=false"]


def _snapshot(root: str) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): (st.st_size, st.st_mtime_ns)
            for d, _, files in os.walk(root) for f in files for st in [os.stat(os.path.join(d, f))]}


@pytest.fixture
def trained(tmp_path):
    """A run trained one step on a small corpus, its tokenizer and data/ made by raylm's own
    stages (in this process), so its checkpoint records the tokenizer's hash and the data's key."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = ["some", "words", "here", "and", "there", "code", "river", "stone", "light", "north"]
    (corpus / "a.jsonl").write_text("".join(
        json.dumps({"text": f"document {i}: " + " ".join(rng.choice(words) for _ in range(60))}) + "\n"
        for i in range(200)))
    base = [f"storage={tmp_path}", f"data.path={corpus}", *RUN]
    cfg, tok = ensure_tokenizer(absolute_paths(load_config(overrides=base)))
    _, manifest = ensure_data(cfg, tok)
    blocks = np.random.default_rng(0).integers(0, tok.vocab_size, (8, 33)).astype(np.int32)
    train_local(cfg, blocks, blocks[:4], log=lambda *_: None, manifest=manifest)
    return base, cfg.run_dir


def test_the_same_settings_pass_the_check_before_the_data(trained):
    """What pretrain holds at that point (the model's vocabulary not yet resolved) resumes."""
    base, run_dir = trained
    cfg = absolute_paths(load_config(overrides=base))
    files, val_files = pipeline.check_resume_before_data(cfg, "auto", None)
    assert [f.uri for f in files] == [os.path.join(os.path.dirname(run_dir), "corpus", "a.jsonl")]


@pytest.mark.parametrize("change,refused", [("seed=7", "seed=1337, now 7"), ("data.min_chars=2", "data_key=")],
                         ids=["seed", "data"])
def test_a_refused_resume_prepares_no_data_and_starts_no_cluster(trained, monkeypatch, change, refused):
    base, run_dir = trained
    data = os.path.join(run_dir, "data")
    before = _snapshot(data)
    started = []

    def init_ray(*args, **kwargs):
        started.append(args)
        raise AssertionError("Ray started for a resume the checkpoint refuses")

    monkeypatch.setattr(pipeline, "init_ray", init_ray)
    with pytest.raises(ConfigError, match=refused):
        pretrain(load_config(overrides=[*base, change, "train.max_steps=2"]), samples=False)
    assert started == []
    assert _snapshot(data) == before
