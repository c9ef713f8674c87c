"""raylm.losses' CUDA-only branches, run on CPU: a tensor subclass reports is_cuda, and the
mixed-dtype kernels (torch.mm / torch.addmm with out_dtype, CUDA-only) are stood in for.

- Once the fp32-output addmm fails, every later call must still add the fp32 product
  (`_mm_f32`), as the first one and the warning do, not a bf16-rounded one.
- An out-of-memory error in the fp32-output mm is re-raised, not taken for a missing kernel
  (which would switch the fp32 logits off for the rest of the process).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from raylm import losses


class _FakeCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def _mm_with_out_dtype(real_mm):
    def mm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_mm(a, b)
        return real_mm(a.float(), b.float()).to(out_dtype)  # what the CUDA kernel's fp32 accumulator gives
    return mm


def test_addmm_fallback_keeps_adding_fp32_products(monkeypatch):
    monkeypatch.setattr(losses, "_cuda_addmm_out_dtype", True)
    monkeypatch.setattr(losses, "_cuda_out_dtype", True)
    monkeypatch.setattr(torch, "mm", _mm_with_out_dtype(torch.mm))

    def no_kernel(*args, **kwargs):
        raise RuntimeError("self and mat2 must have the same dtype")
    monkeypatch.setattr(torch, "addmm", no_kernel)

    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 40, generator=g).bfloat16().as_subclass(_FakeCuda)
    b = torch.randn(40, 16, generator=g).bfloat16()
    exact = a.float().as_subclass(torch.Tensor) @ b.float()
    acc = torch.zeros(24, 16)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for _ in range(3):  # the first call fails over; the next two find the switch off
            losses._addmm_f32_(acc, a, b)
    assert losses._cuda_addmm_out_dtype is False
    torch.testing.assert_close(acc.as_subclass(torch.Tensor), 3 * exact, rtol=1e-6, atol=1e-5)


def test_mm_out_of_memory_is_raised_and_keeps_the_fp32_path(monkeypatch):
    monkeypatch.setattr(losses, "_cuda_out_dtype", True)
    real_mm = torch.mm

    def oom(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_mm(a, b)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    monkeypatch.setattr(torch, "mm", oom)
    a = torch.randn(4, 8).bfloat16().as_subclass(_FakeCuda)
    b = torch.randn(8, 5).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "upcasting bf16 products instead" warning either
        with pytest.raises(torch.OutOfMemoryError):
            losses._mm_f32(a, b)
    assert losses._cuda_out_dtype is True
