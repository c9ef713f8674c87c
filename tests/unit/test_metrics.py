"""Throughput arithmetic (FLOPs per token, device peaks, MFU) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from raylm.config import MODEL_PRESETS, ModelConfig, TrainConfig
from raylm.metrics import flops_per_token, mfu, peak_flops
from raylm.model import build_model
from raylm.train import lr_at

SMALL = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)


# --------------------------------------------------------------------------- FLOPs


def test_flops_per_token_by_hand():
    d, L, V, T, hd = 32, 2, 128, 64, 8
    attn = d * 4 * hd + d * 2 * hd + d * 2 * hd + 4 * hd * d  # wq, wk, wv (2 kv heads), wo
    mlp = 3 * d * 96
    norms = 2 * d
    non_embedding = L * (attn + mlp + norms) + d  # + final norm
    n = non_embedding + V * d  # the LM head is a real matmul per token
    expected = 6 * n + 12 * L * d * T
    assert flops_per_token(SMALL, T) == expected
    # wq 1024 + wk 512 + wv 512 + wo 1024 + mlp 9216 + norms 64 per layer; final norm 32; head 4096
    assert expected == 6 * (2 * (1024 + 512 + 512 + 1024 + 9216 + 64) + 32 + 4096) + 12 * 2 * 32 * 64
    assert expected == 222_144


def test_flops_per_token_counts_head_once_whether_tied_or_not():
    untied = replace(SMALL, tie_embeddings=False)
    assert flops_per_token(untied, 64) == flops_per_token(SMALL, 64)


def test_flops_match_built_model_params():
    model = build_model(SMALL, seed=0)
    n_body = sum(p.numel() for name, p in model.named_parameters() if name != "tok_embeddings.weight")
    # Tied: the head reuses the embedding, yet still costs vocab*dim multiply-adds per token.
    n = n_body + SMALL.vocab_size * SMALL.dim
    assert flops_per_token(SMALL, 10) == 6 * n + 12 * SMALL.n_layers * SMALL.dim * 10


def test_flops_grow_with_seq_len():
    assert flops_per_token(SMALL, 128) - flops_per_token(SMALL, 64) == 12 * 2 * 32 * 64


def test_7b_flops_order_of_magnitude():
    f = flops_per_token(MODEL_PRESETS["7b"], 4096)
    assert 6 * 6.7e9 < f < 6 * 7.3e9 + 12 * 32 * 4096 * 4096


# --------------------------------------------------------------------------- peaks and MFU


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12),
])
def test_peak_flops_known_devices(name, peak):
    assert peak_flops(name) == peak


@pytest.mark.parametrize("name", ["cpu", "", "Tesla K80", "Some Future GPU"])
def test_peak_flops_unknown_is_none(name):
    assert peak_flops(name) is None


def test_mfu_arithmetic():
    fpt = flops_per_token(SMALL, 64)
    got = mfu(1e6, SMALL, 64, "NVIDIA H100 80GB HBM3", n_devices=4)
    assert got == pytest.approx(1e6 * fpt / (989e12 * 4))
    assert mfu(1e6, SMALL, 64, "NVIDIA H100 80GB HBM3") == pytest.approx(4 * got)
    assert mfu(1e6, SMALL, 64, "cpu") is None


def test_mfu_full_utilisation_is_one():
    fpt = flops_per_token(SMALL, 64)
    assert mfu(312e12 / fpt, SMALL, 64, "NVIDIA A100-SXM4-80GB") == pytest.approx(1.0)


# --------------------------------------------------------------------------- learning rate


TC = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)


def test_warmup_is_linear():
    lrs = [lr_at(s, TC) for s in range(TC.warmup_steps)]
    assert lrs[0] == pytest.approx(1e-4)  # never exactly 0: the first step does something
    diffs = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx(1e-4) for d in diffs)


def test_peak_at_end_of_warmup():
    assert lr_at(TC.warmup_steps - 1, TC) == pytest.approx(TC.lr)
    assert lr_at(TC.warmup_steps, TC) == pytest.approx(TC.lr)
    assert max(lr_at(s, TC) for s in range(TC.max_steps + 5)) == pytest.approx(TC.lr)


def test_cosine_decays_to_min_ratio():
    floor = TC.lr * TC.min_lr_ratio
    assert lr_at(TC.max_steps, TC) == pytest.approx(floor)
    assert lr_at(TC.max_steps + 100, TC) == pytest.approx(floor)  # stays at the floor
    mid = TC.warmup_steps + (TC.max_steps - TC.warmup_steps) // 2
    assert lr_at(mid, TC) == pytest.approx(floor + (TC.lr - floor) / 2)
    quarter = TC.warmup_steps + 25
    assert lr_at(quarter, TC) == pytest.approx(floor + (TC.lr - floor) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_monotone_decreasing_after_warmup():
    lrs = [lr_at(s, TC) for s in range(TC.warmup_steps, TC.max_steps + 1)]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))


def test_no_warmup():
    tc = replace(TC, warmup_steps=0)
    assert lr_at(0, tc) == pytest.approx(tc.lr)
    assert lr_at(tc.max_steps, tc) == pytest.approx(tc.lr * tc.min_lr_ratio)


def test_time_progress_drives_the_decay_when_ahead_of_the_steps():
    floor = TC.lr * TC.min_lr_ratio
    early = TC.warmup_steps + 5  # 5% of the way by steps
    assert lr_at(early, TC, time_progress=0.5) == pytest.approx(floor + (TC.lr - floor) / 2)
    assert lr_at(early, TC, time_progress=1.0) == pytest.approx(floor)
    assert lr_at(early, TC, time_progress=3.0) == pytest.approx(floor)  # past the budget: the floor
    assert lr_at(early, TC, time_progress=0.01) == lr_at(early, TC)  # behind the steps: the steps decide
    assert lr_at(2, TC, time_progress=0.9) == lr_at(2, TC)  # warmup counts steps only
