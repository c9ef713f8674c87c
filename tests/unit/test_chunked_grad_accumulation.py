"""The chunked loss accumulates d/d weight (V x d, fp32) in place: `grad_w += a @ b` made a
V x d fp32 temporary every chunk, V * d * 4 bytes on top of the accumulator at the peak
(0.8 GB for a 50k x 4096 head). Same sums as before, bit for bit on CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raylm import losses
from raylm.losses import chunked_cross_entropy

N, V, D, CHUNK = 40, 96, 24, 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    return hidden, weight, targets


class FreshTensors(TorchDispatchMode):
    """Shapes and dtypes of the tensors the ops under it allocate (outputs sharing no storage
    with an input: an in-place or out= op's result is not one)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[tuple, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.made.append((tuple(o.shape), o.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_fp32_vocab_by_width_tensor_whatever_the_chunk_count(dtype):
    hidden, weight, targets = _inputs(dtype)
    with FreshTensors() as seen:
        chunked_cross_entropy(hidden, weight, targets, CHUNK)
    big = [t for t in seen.made if t == ((V, D), torch.float32)]
    assert N // CHUNK == 5
    assert len(big) == 1, f"{len(big)} fp32 [V, d] tensors made over {N // CHUNK} chunks (the accumulator is one)"


def _run(dtype, z_loss):
    hidden, weight, targets = _inputs(dtype, seed=1)
    loss = chunked_cross_entropy(hidden, weight, targets, CHUNK, z_loss=z_loss)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_same_loss_and_gradients_as_the_temporary_per_chunk(monkeypatch, dtype, z_loss):
    new = _run(dtype, z_loss)

    def old(acc, a, b):  # what the loop did before: add a fresh fp32 product
        acc += losses._mm_f32(a, b)

    monkeypatch.setattr(losses, "_addmm_f32_", old, raising=False)
    before = _run(dtype, z_loss)
    for name, a, b in zip(("loss", "d hidden", "d weight"), new, before):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
