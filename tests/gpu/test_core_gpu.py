"""The core on one CUDA GPU, in a few minutes: what the CPU tiers cannot run.

bf16 FSDP2 over NCCL on a one-process group, compile with activation checkpointing, float8 at
the 1B shape, the compiled decode step (CUDA graphs) against eager and the SDPA kernel its
mask selects, the chunked loss's fp32-output matmul, resume, and host-side batch caches.
Run: `python -m pytest -q tests/gpu` (or `python benchmarks/gpu_suite.py`, which runs this
tier first). Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.config import MODEL_PRESETS, ModelConfig, TrainConfig, load_config
from raylm.objectives import NextTokenObjective
from raylm.train import make_optimizer, train_step

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SMALL = ModelConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=256)


@pytest.fixture(scope="module")
def group():
    """The one-process NCCL group: the FSDP2 path, mixed precision included, a Ray Train
    worker runs (raylm.parallel.init_local_process_group)."""
    import torch.distributed as dist

    from raylm.parallel import init_local_process_group

    init_local_process_group(CUDA)
    assert dist.get_backend() == "nccl"
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _batches(cfg: ModelConfig, n: int, micro: int, seq: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g).to(CUDA)} for _ in range(n)]


def _train(model, batches, steps: int, objective=None) -> list[float]:
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3), CUDA)
    objective = objective or NextTokenObjective(chunk_size=2048)
    return [train_step(model, optimizer, [batches[i % len(batches)]], objective, 1e-3, 1.0).loss
            for i in range(steps)]


def test_bf16_fsdp2_over_nccl_trains(group):
    from raylm.parallel import build_parallel_model, is_sharded

    model = build_parallel_model(SMALL, CUDA, "bf16", seed=0)
    assert is_sharded(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 masters
    seen = []
    model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = _train(model, _batches(SMALL, 1, 4, 128), 8)  # one batch, repeated: memorised
    assert seen[0] == torch.bfloat16  # compute in bf16
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_compile_with_activation_checkpointing_matches_eager(group):
    from raylm.parallel import build_parallel_model

    batches = _batches(SMALL, 2, 4, 128, seed=1)
    eager = _train(build_parallel_model(SMALL, CUDA, "bf16", seed=3), batches, 4)
    torch._dynamo.reset()
    model = build_parallel_model(SMALL, CUDA, "bf16", seed=3, compile=True, activation_checkpointing=True)
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.layers)
    compiled = _train(model, batches, 4)
    np.testing.assert_allclose(compiled, eager, rtol=2e-2)  # bf16: kernels differ in rounding


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 matmuls need compute capability 8.9 (Ada, Hopper) or later")
def test_float8_on_the_1b_shape_trains_a_few_steps(group):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from raylm.parallel import build_parallel_model

    cfg = MODEL_PRESETS["1b"].with_vocab(32000)
    batches = _batches(cfg, 1, 2, 1024, seed=2)
    model = build_parallel_model(cfg, CUDA, "bf16", seed=4, float8=True)
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 7 * cfg.n_layers
    losses = _train(model, batches, 4)
    del model
    torch.cuda.empty_cache()
    plain = _train(build_parallel_model(cfg, CUDA, "bf16", seed=4), batches, 1)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert losses[0] == pytest.approx(plain[0], rel=2e-2)  # the benchmark's float8 loss tolerance


def test_compiled_decode_step_matches_eager_with_cuda_graphs():
    from raylm.generate import compile_decode_step, generate, greedy_decode
    from raylm.model import build_model

    model = build_model(SMALL, CUDA, seed=5).eval()
    prompt = torch.randint(0, SMALL.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6)).to(CUDA)
    eager = greedy_decode(model, prompt, 24)
    torch._dynamo.reset()
    step = compile_decode_step()  # mode="reduce-overhead": CUDA graphs
    assert torch.equal(greedy_decode(model, prompt, 24, step=step), eager)
    assert torch.equal(greedy_decode(model, prompt, 24, step=step), eager)  # replays, same tokens
    ids = prompt[0].tolist()
    assert generate(model, ids, 16, temperature=0, step=step) == generate(model, ids, 16, temperature=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_mask_with_gqa_runs_on_the_memory_efficient_kernel(dtype):
    """The decode step's shapes (one query per sequence against the whole static cache, a
    boolean mask, 8 query heads over 2 kv heads): raylm.model.attend must run with only the
    memory-efficient kernel allowed, never needing the math kernel; and the unmasked causal
    call of training must run on flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from raylm.model import attend

    B, H, KV, S, D = 4, 8, 2, 1024, 64
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=CUDA, dtype=dtype, generator=g)
    k, v = (torch.randn(B, KV, S, D, device=CUDA, dtype=dtype, generator=g) for _ in range(2))
    mask = torch.arange(S, device=CUDA)[None, :] <= torch.tensor([300], device=CUDA)[:, None]  # (T=1, S)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        fast = attend(q, k, v, mask, causal=False)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(H // KV, 1), v.float().repeat_interleave(H // KV, 1), attn_mask=mask)
    torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2)
    qt = torch.randn(B, H, 256, D, device=CUDA, dtype=dtype, generator=g)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        attend(qt, k[:, :, :256], v[:, :, :256], None, causal=True)


def test_chunked_loss_writes_fp32_logits_from_the_bf16_matmul():
    from raylm import losses

    a = torch.randn(64, 256, device=CUDA, dtype=torch.bfloat16)
    b = torch.randn(256, 512, device=CUDA, dtype=torch.bfloat16)
    out = losses._mm_f32(a, b)
    assert out.dtype == torch.float32 and losses._cuda_out_dtype  # the out_dtype path, no fallback
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-2, atol=1e-2)


def test_resume_on_gpu_is_bit_exact_under_deterministic_algorithms(group, tmp_path):
    """train_local on CUDA (bf16 FSDP2, the chunked loss: the CUDA defaults, compile off to
    stay short): stopped at step 5 and resumed from its step-3 checkpoint, the losses equal
    the uninterrupted run's exactly. conftest sets CUBLAS_WORKSPACE_CONFIG before CUDA starts."""
    import os

    from raylm.train import train_local

    rng = np.random.default_rng(0)
    train = (np.arange(65)[None, :] * rng.integers(1, 7, (64, 1)) % 2048).astype(np.int32)
    val = train[:8]
    common = ["model.vocab_size=2048", "model.dim=128", "model.n_layers=2", "model.n_heads=4",
              "model.max_seq_len=64", "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8",
              "train.warmup_steps=2", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=3",
              "train.eval_batches=1", "train.max_steps=8", "train.compile=false", "train.async_checkpoint=false"]
    cfg = {n: load_config(overrides=[f"storage={tmp_path}", f"name={n}", *common]) for n in ("whole", "part")}
    torch.use_deterministic_algorithms(True)
    try:
        train_local(cfg["whole"], train, val, device="cuda", log=lambda *_: None)
        os.environ["RAYLM_INJECT_FAILURE"] = "step=5,rank=0,kind=raise"
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                train_local(cfg["part"], train, val, device="cuda", log=lambda *_: None)
        finally:
            del os.environ["RAYLM_INJECT_FAILURE"]
        train_local(cfg["part"], train, val, resume="must", device="cuda", log=lambda *_: None)
    finally:
        torch.use_deterministic_algorithms(False)

    def losses(run: Path):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    assert losses(tmp_path / "part") == losses(tmp_path / "whole")


def test_batch_caches_stay_on_the_host():
    from raylm.batches import RankBatches, rank_val_batches, reshuffled

    rows = torch.arange(32, dtype=torch.int32)[:, None].expand(32, 9).contiguous()
    kept = [{"tokens": rows[i:i + 8]} for i in range(0, 32, 8)]
    rb = RankBatches(lambda epoch: iter(kept), 8, 2, 0, 1, 32, 0, CUDA)
    step = next(iter(rb))
    torch.cuda.synchronize()  # the copies were asynchronous, from pinned memory
    assert all(mb["tokens"].is_cuda and mb["tokens"].dtype == torch.long for mb in step)
    assert [r for mb in step for r in mb["tokens"][:, 0].tolist()] == list(range(8))
    assert all(v.device.type == "cpu" for b in kept for v in b.values())
    val = rank_val_batches({"tokens": rows}, TrainConfig(micro_batch_size=4, eval_batches=2), 0, 1, CUDA)
    assert all(v.device.type == "cpu" for b in val.host for v in b.values())
    assert all(mb["tokens"].is_cuda for mb in val)
    # A cache that did end up on the GPU still reshuffles: the permutation follows the rows.
    again = reshuffled([{k: v.to(CUDA) for k, v in b.items()} for b in kept], seed=1, epoch=1)
    assert sorted(r for b in again for r in b["tokens"][:, 0].tolist()) == list(range(32))
