"""dpo.precompute_reference computes the reference's log-probabilities as the live frozen
reference would beside the policy: on the policy's device (GPU actors with train.use_gpu), in
its compute dtype (bf16 where train.precision resolves to it, as FSDP2's mixed-precision
compute copies) and with its head chunking; the key of the stored pass covers those numerics.
On CPU with the defaults nothing changes: fp32, one single-CPU actor, the same key, the same
numbers bit for bit. (The CUDA path itself needs a GPU: here its plan is checked, and its
numerics through bf16 on CPU.)"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
import torch.distributed as dist

import raylm.checkpoint
import raylm.posttrain as posttrain
from raylm.config import Config, DataConfig, ModelConfig, TrainConfig
from raylm.model import Transformer
from raylm.objectives import reference_logprobs

MODEL = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
COLUMNS = ["chosen", "chosen_mask", "rejected", "rejected_mask"]
CPU = torch.device("cpu")


def _cfg(tmp_path, **train) -> Config:
    return Config(storage=str(tmp_path / "runs"), model=MODEL, data=DataConfig(seq_len=12),
                  train=dataclasses.replace(TrainConfig(), **train))


def _rows(n, T=13, seed=0):
    g = np.random.default_rng(seed)
    prompt = g.integers(0, MODEL.vocab_size, (n, 4))
    batch = {"chosen": np.concatenate([prompt, g.integers(0, MODEL.vocab_size, (n, T - 4))], 1).astype(np.int32),
             "rejected": np.concatenate([prompt, g.integers(0, MODEL.vocab_size, (n, T - 4))], 1).astype(np.int32)}
    for k in ("chosen", "rejected"):
        mask = np.zeros((n, T), np.int8)
        for i in range(n):
            mask[i, 4:T - (i + (k == "rejected")) % 3] = 1
        batch[f"{k}_mask"] = mask
    return batch


class _Scored:
    def __init__(self, batch):
        self.batch = batch

    def iter_batches(self, batch_format="numpy", batch_size=None):
        yield self.batch


class _Dataset:
    """A split's rows; map_batches runs the stage class in this process, as one actor would."""

    calls: list[dict] = []

    def __init__(self, batch):
        self.batch = batch

    def map_batches(self, fn, **kwargs):
        _Dataset.calls.append(kwargs)
        return _Scored(fn(**kwargs["fn_constructor_kwargs"])(dict(self.batch)))


class _Unscored(_Dataset):
    def map_batches(self, fn, **kwargs):  # the plan alone: no model is loaded
        _Dataset.calls.append(kwargs)
        n = len(self.batch["chosen"])
        return _Scored({**self.batch, "ref_chosen_logp": np.zeros(n, np.float32),
                        "ref_rejected_logp": np.zeros(n, np.float32)})


@pytest.fixture
def weights(monkeypatch):
    """A tiny model's fp32 weights, which "the checkpoint" loads (as DCP does: cast into
    the model's parameters)."""
    torch.manual_seed(3)
    with torch.device("meta"):
        model = Transformer(MODEL)
    model.to_empty(device="cpu")
    model.init_weights()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(raylm.checkpoint, "load_model_weights", lambda m, ckpt, s3=None: m.load_state_dict(sd))
    # ... and whose index the loader compares the model with before allocating it.
    monkeypatch.setattr(raylm.checkpoint, "model_entries", lambda ckpt, s3=None: {k: v.shape for k, v in sd.items()})
    return sd


def _run(tmp_path, monkeypatch, cfg, dataset=_Dataset, n=(5, 3)):
    _Dataset.calls.clear()
    splits = {"train": dataset(_rows(n[0])), "val": dataset(_rows(n[1], seed=1))}
    monkeypatch.setattr(posttrain, "prepared_datasets", lambda d, m, s3: splits)
    manifest = {"key": "data-key", "columns": COLUMNS, "row_bytes": 4 * 13 * 4, "seq_len": 12,
                "train": {"blocks": n[0]}, "val": {"blocks": n[1]}}
    parent = {"sha256": "p" * 64, "checkpoint": str(tmp_path / "parent")}
    out, new = posttrain.precompute_reference(cfg, str(tmp_path / "data"), manifest, parent)
    return out, new, splits


def _stored(new, out, split):
    import pyarrow.parquet as pq

    tables = [pq.read_table(f"{out}/{s['path']}") for s in new[split]["shards"]]
    return {k: np.concatenate([t.column(k).to_numpy() for t in tables]) for k in posttrain.REFERENCE_COLUMNS}


def _old_cpu_reference(sd, batch):
    """The pass as it computed before: fp32 on CPU, random init then the weights, full logits."""
    with torch.device("meta"):
        model = Transformer(MODEL)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(sd)
    cols = {k: torch.as_tensor(batch[k]).long() if not k.endswith("mask") else torch.as_tensor(batch[k]).bool()
            for k in COLUMNS}
    return {k: v.numpy() for k, v in reference_logprobs(model.eval(), cols).items()}


def test_the_cpu_plan_is_the_old_pass(tmp_path):
    plan = posttrain.reference_pass(_cfg(tmp_path), 1000)
    assert (plan.device, plan.precision, plan.chunk_size, plan.actors, plan.num_gpus, plan.num_cpus,
            plan.batch_size, plan.numerics()) == ("cpu", "fp32", 0, 1, 0, 1.0, 64, "")


def test_the_cpu_pass_is_unchanged(tmp_path, monkeypatch, weights, one_thread):
    out, new, splits = _run(tmp_path, monkeypatch, _cfg(tmp_path))
    # The key of passes stored before stays: they are reused, not computed again.
    assert new["key"] == hashlib.sha256(f"{'p' * 64}:data-key".encode()).hexdigest()
    for kwargs in _Dataset.calls:
        assert kwargs["compute"].max_size == 1 and kwargs["num_cpus"] == 1 and not kwargs.get("num_gpus")
        assert kwargs["batch_size"] == 64
    for split, ds in splits.items():
        old, stored = _old_cpu_reference(weights, ds.batch), _stored(new, out, split)
        for k in posttrain.REFERENCE_COLUMNS:
            assert np.array_equal(stored[k], old[k]), k  # bit for bit


def test_on_gpus_the_pass_asks_for_gpus_and_the_policys_numerics(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, use_gpu=True, num_workers=4, cpus_per_worker=1.0, micro_batch_size=2, global_batch_size=8)
    plan = posttrain.reference_pass(cfg, 1000)
    assert (plan.device, plan.precision, plan.chunk_size, plan.actors, plan.num_gpus, plan.batch_size) == \
        ("cuda", "bf16", 2048, 4, 1, 2)
    assert posttrain.reference_pass(cfg, 3).actors == 2  # no actor (and model) without a batch to score
    assert posttrain.reference_pass(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, precision="fp32", loss_chunk_size=0)), 9).numerics() == "cuda:fp32"

    out, new, _ = _run(tmp_path, monkeypatch, cfg, _Unscored, n=(9, 3))
    train, val = _Dataset.calls
    for kwargs, actors in ((train, 4), (val, 2)):
        assert kwargs["num_gpus"] == 1 and kwargs["compute"].max_size == actors and kwargs["batch_size"] == 2
        assert {k: kwargs["fn_constructor_kwargs"][k] for k in ("device", "precision", "chunk_size")} == \
            {"device": "cuda", "precision": "bf16", "chunk_size": 2048}
    # Other numerics, another stored pass: the CPU's fp32 one is not reused for a bf16 policy.
    assert new["key"] != hashlib.sha256(f"{'p' * 64}:data-key".encode()).hexdigest()
    assert out.endswith(f"reference-{new['key'][:16]}")
    assert new["reference"]["precision"] == "bf16" and new["reference"]["device"] == "cuda"


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_bf16_pass_matches_the_live_sharded_reference(tmp_path, monkeypatch, weights, one_thread, chunk):
    """train.precision=bf16 (what "auto" is on CUDA), here on CPU: the stored log-probs are the
    ones the live frozen reference (FSDP2, bf16 compute copies) computes, not fp32 ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raylm.parallel import build_parallel_model, init_local_process_group

    cfg = _cfg(tmp_path, precision="bf16", loss_chunk_size=chunk)
    out, new, splits = _run(tmp_path, monkeypatch, cfg)
    init_local_process_group(CPU)
    try:
        live = build_parallel_model(MODEL, CPU, "bf16", seed=0, frozen=True)
        full = {k: v.clone() for k, v in weights.items()}  # set_model_state_dict shards the dict's values in place
        set_model_state_dict(live, full, options=StateDictOptions(full_state_dict=True))
        live.requires_grad_(False).eval()
        for split, ds in splits.items():
            cols = {k: torch.as_tensor(ds.batch[k]).long() if not k.endswith("mask")
                    else torch.as_tensor(ds.batch[k]).bool() for k in COLUMNS}
            want = {k: v.numpy() for k, v in reference_logprobs(live, cols, chunk).items()}
            fp32 = _old_cpu_reference(weights, ds.batch)
            stored = _stored(new, out, split)
            for k in posttrain.REFERENCE_COLUMNS:
                np.testing.assert_allclose(stored[k], want[k], rtol=0, atol=1e-6, err_msg=k)  # bit for bit here
                assert np.abs(fp32[k] - want[k]).max() > 5e-4  # the fp32 pass was off by this much
        assert _Dataset.calls[0]["fn_constructor_kwargs"]["precision"] == "bf16"
    finally:
        dist.destroy_process_group()
