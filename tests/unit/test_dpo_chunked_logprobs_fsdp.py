"""DPO's chunked log-probabilities (train.loss_chunk_size) under FSDP2, as a Ray Train worker
runs them: the policy's loss and gradients equal the full-logits ones, and the frozen
reference, whose root reshards after every forward, still gets its head gathered and is left
fully resharded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from raylm.config import ModelConfig
from raylm.objectives import DPOObjective
from raylm.parallel import build_parallel_model, init_local_process_group
from tests.unit.test_dpo_prompt_split_and_settings import _dpo_batch

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _group(one_thread):
    init_local_process_group(CPU)
    yield
    dist.destroy_process_group()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("precision,tied", [("fp32", True), ("fp32", False), ("bf16", False)])
def test_chunked_dpo_under_fsdp_matches_the_full_logits(precision, tied):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      tie_embeddings=tied)
    reference = build_parallel_model(cfg, CPU, precision, seed=0, frozen=True).requires_grad_(False).eval()
    policy = build_parallel_model(cfg, CPU, precision, seed=1)
    batch = _dpo_batch(vocab=cfg.vocab_size)
    results = []
    for size in (0, 5):
        obj = DPOObjective(beta=0.1, reference=reference, chunk_size=size)
        loss = obj.loss_sum(policy, batch)
        loss.backward()
        results.append((loss.detach(), {n: _full(p.grad).clone() for n, p in policy.named_parameters()}))
        policy.zero_grad(set_to_none=True)
        # Nothing of the reference stays gathered: every parameter is its shard again.
        assert all(isinstance(p, DTensor) for p in reference.parameters())
    (l0, g0), (l1, g1) = results
    assert abs(l0.item() - 3 * math.log(2)) > 1e-3  # policy != reference: a real Δ
    tol = {} if precision == "fp32" else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(l1, l0, **tol)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name, **tol)
    # A second chunked step works the same (the registered forward method is reused).
    second = DPOObjective(beta=0.1, reference=reference, chunk_size=5).loss_sum(policy, batch)
    second.backward()
    torch.testing.assert_close(second.detach(), l1)
