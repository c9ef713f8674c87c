"""Failure recovery on a real 2-worker Ray Train run (FSDP2 over gloo).

A worker fails once after step 6 (checkpoints every 4 steps); `FailureConfig(max_failures=1)`
restarts the worker group, which resumes from the step-4 checkpoint. The resumed run must
reproduce the uninterrupted run's per-step losses exactly (==, not isclose), consume the
same blocks, and say which checkpoint it loaded."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import ray.train

from raylm.config import load_config
from raylm.pipeline import ensure_corpus, ensure_data, ensure_tokenizer
from raylm.train import run_ray_training

pytestmark = pytest.mark.integration

SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "data.seq_len=64",
    "tokenizer.vocab_size=512", "tokenizer.sample_bytes=300000", "train.micro_batch_size=4",
    "train.global_batch_size=8", "train.warmup_steps=2", "train.max_steps=10", "train.log_every=1",
    "train.eval_every=100", "train.ckpt_every=4", "train.eval_batches=1", "train.keep_checkpoints=5",
]


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """Tokenizer and prepared blocks shared by every run here, so runs differ only in failures."""
    storage = tmp_path_factory.mktemp("recovery")
    cfg = load_config(overrides=[f"storage={storage}", "name=base", *SMALL])
    cfg = ensure_corpus(cfg)
    cfg, tok = ensure_tokenizer(cfg)
    data_dir, manifest = ensure_data(cfg, tok)
    return cfg, data_dir, manifest


def run(prepared, name: str, failure: str | None) -> list[dict]:
    base, data_dir, manifest = prepared
    cfg = load_config(overrides=[f"storage={base.storage}", f"name={name}", f"data.path={base.data.path}",
                                 f"tokenizer.path={base.tokenizer.path}", *SMALL])
    cfg = dataclasses.replace(cfg, model=base.model)  # the vocabulary resolved against the tokenizer
    if failure:
        os.environ["RAYLM_INJECT_FAILURE"] = failure
    try:
        result = run_ray_training(cfg, data_dir, manifest, resume="auto", max_failures=1 if failure else 0)
    finally:
        os.environ.pop("RAYLM_INJECT_FAILURE", None)
    assert result.error is None, result.error
    lines = Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def uninterrupted(prepared):
    return run(prepared, "clean", None)


def key(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["consumed_blocks"]) for r in rows]


@pytest.mark.parametrize("kind", ["raise", "sigkill"])
def test_worker_failure_resumes_bit_exact(prepared, uninterrupted, kind, capfd):
    rows = run(prepared, f"fail-{kind}", f"step=6,rank=1,kind={kind}")
    out = capfd.readouterr().out
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert key(rows) == key(uninterrupted), "losses after recovery differ from the uninterrupted run"
    assert "resumed from" in out and "ckpt-00000004" in out
    assert Path(prepared[0].storage, f"fail-{kind}", "injected-failure-6").is_file()


def test_resume_on_a_different_number_of_workers(prepared, uninterrupted, capfd):
    """2 workers checkpoint at step 4 and then fail for good; 1 worker resumes. DCP reshards
    model and optimizer, the global batch stays 8 (1 worker accumulates 2 micro-batches), and
    the data stream continues at the same block. Losses after the resume match the 2-worker
    run to round-off, not bit for bit: the reduction order differs."""
    base, data_dir, manifest = prepared
    common = [f"storage={base.storage}", "name=reshard", f"data.path={base.data.path}",
              f"tokenizer.path={base.tokenizer.path}", *SMALL]
    cfg = dataclasses.replace(load_config(overrides=common), model=base.model)
    os.environ["RAYLM_INJECT_FAILURE"] = "step=6,rank=0,kind=raise"
    try:
        with pytest.raises(ray.train.TrainingFailedError):
            run_ray_training(cfg, data_dir, manifest, resume="auto")
    finally:
        os.environ.pop("RAYLM_INJECT_FAILURE")
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=1, cpus_per_worker=2))
    capfd.readouterr()
    assert run_ray_training(one, data_dir, manifest, resume="must").error is None
    out = capfd.readouterr().out
    assert "ckpt-00000004" in out and "written by 2 workers" in out
    lines = Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r.get("kind") == "train"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["consumed_blocks"] for r in rows] == [r["consumed_blocks"] for r in uninterrupted]
    assert key(rows[:4]) == key(uninterrupted[:4])
    for got, want in zip(rows[4:], uninterrupted[4:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), got["step"]
