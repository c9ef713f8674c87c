"""`train.compile=True` (per-block torch.compile in raylm.parallel) computes the same training
steps as eager: same loss, same gradients, same weights after the update, on CPU.

Inductor on CPU compiles slowly, so the model is tiny and all blocks share one compiled
graph (forward and backward are compiled once). The comparison is on the plain model and on
the FSDP2 one-process path that the benchmark and a 1-worker Ray Train run use.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from raylm.config import ModelConfig, TrainConfig
from raylm.parallel import build_parallel_model, init_local_process_group
from raylm.train import NextTokenObjective, make_optimizer, train_step

CFG = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  ffn_multiple_of=16)
TC = TrainConfig(lr=1e-2)
CPU = torch.device("cpu")


def batches(n_steps: int = 2) -> list[list[dict]]:
    """n_steps optimizer steps of two micro-batches each (gradient accumulation included)."""
    g = torch.Generator().manual_seed(0)
    return [[{"tokens": torch.randint(0, CFG.vocab_size, (2, 17), generator=g)} for _ in range(2)]
            for _ in range(n_steps)]


def plain_name(name: str) -> str:
    return name.replace("._orig_mod", "")


def grads_of(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[plain_name(name)] = g.detach().clone()
    return out


def weights_of(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        w = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[plain_name(name)] = w.detach().clone()
    return out


def run(compile: bool) -> tuple[list, dict, dict]:
    """(per-step StepStats, gradients of the first micro-batch before any update, final weights)."""
    torch._dynamo.reset()  # each run compiles from scratch: no graph cached from another test
    model = build_parallel_model(CFG, CPU, "fp32", seed=0, compile=compile)
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) == compile for b in model.layers)
    objective = NextTokenObjective()
    data = batches()
    mb = data[0][0]
    (objective.loss_sum(model, mb) / objective.count(mb)).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    opt = make_optimizer(model, TC, CPU)
    stats = [train_step(model, opt, step, objective, TC.lr, TC.grad_clip) for step in data]
    if compile:  # inductor really ran: a compiled forward and backward, not an eager fallback
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] >= 1
    return stats, grads, weights_of(model)


def assert_same_training(eager, compiled) -> None:
    (s_e, g_e, w_e), (s_c, g_c, w_c) = eager, compiled
    assert set(g_c) == set(g_e) and len(g_e) == 2 + 9 * CFG.n_layers  # embedding, final norm, 9 per block
    for name, g in g_e.items():
        torch.testing.assert_close(g_c[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"gradient of {name}: {m}")
    for a, b in zip(s_e, s_c):
        assert not a.skipped and not b.skipped
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    # Weights after two updates. Adam divides by sqrt(v), which magnifies rounding in
    # near-zero gradients, so the bound is a small fraction of one update (lr), not fp32 eps;
    # a wrong gradient moves a weight by about lr.
    for name, w in w_e.items():
        torch.testing.assert_close(w_c[name], w, rtol=0, atol=0.05 * TC.lr, msg=lambda m: f"weight {name}: {m}")


def test_compiled_blocks_train_like_eager(one_thread):
    assert_same_training(run(compile=False), run(compile=True))


def test_compiled_blocks_train_like_eager_under_fsdp2(one_thread):
    init_local_process_group(CPU)
    try:
        eager, compiled = run(compile=False), run(compile=True)
    finally:
        dist.destroy_process_group()
    assert_same_training(eager, compiled)
