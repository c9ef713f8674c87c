"""`raylm plan`'s memory estimate against CUDA's allocator on real training steps: the FSDP2
bf16 path raylm trains with (one process, `init_local_process_group`), on a 124M model."""

from __future__ import annotations

import pytest
import torch

from raylm.config import MODEL_PRESETS, TrainConfig
from raylm.objectives import NextTokenObjective
from raylm.plan import memory_per_device
from raylm.train import make_optimizer, train_step

pytestmark = pytest.mark.gpu

LOSS_CHUNK = 2048  # what train.loss_chunk_size="auto" means on CUDA


@pytest.fixture(scope="module")
def device():
    import torch.distributed as dist

    from raylm.parallel import init_local_process_group

    dev = torch.device("cuda")
    init_local_process_group(dev)
    yield dev
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing,accumulation,doc_mask", [(False, 1, False), (True, 1, False),
                                                                  (False, 2, False), (False, 1, True)],
                         ids=["plain", "activation-checkpointing", "accumulation", "document-mask"])
def test_memory_estimate_matches_cuda_peak(device, checkpointing, accumulation, doc_mask):
    """Tolerance 20% (wider than the CPU test's 15%, and not yet run on a GPU): the
    allocator's peak also holds kernel workspaces (cuBLAS, SDPA), FSDP's all-gather and
    reduce-scatter buffers and its rounding to 512-byte blocks, which the estimate leaves to
    the plan's headroom; a missing term (the logits, the unsharded gradients under
    accumulation, the activations, document masking's attention bias in every layer) moves
    the total by more than that. Document masking: raylm's SDPA path with the boolean mask
    (`Transformer.doc_mask_kernel = "sdpa"`), rows cut into documents at token id 0."""
    from raylm.parallel import build_parallel_model

    cfg = MODEL_PRESETS["gpt2-124m"].with_vocab(32000)
    micro_batch, seq_len = 8, 1024
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = build_parallel_model(cfg, device, "bf16", seed=0, activation_checkpointing=checkpointing)
    opt = make_optimizer(model, TrainConfig(), device)
    objective = NextTokenObjective(chunk_size=LOSS_CHUNK, doc_sep=0 if doc_mask else None)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        mbs = [{"tokens": torch.randint(1, cfg.vocab_size, (micro_batch, seq_len + 1), device=device, generator=g)}
               for _ in range(accumulation)]
        for mb in mbs:
            mb["tokens"][:, ::300] = 0  # documents of 300 tokens (ignored without doc_mask)
        train_step(model, opt, mbs, objective, 1e-4, 1.0)
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - base
    est = memory_per_device(cfg, seq_len, micro_batch, 1, "bf16", checkpointing, accumulation, sharded=True,
                            loss_chunk=LOSS_CHUNK, doc_mask=doc_mask)
    del model, opt
    assert measured == pytest.approx(est.total, rel=0.20), (measured / 2**30, est)
