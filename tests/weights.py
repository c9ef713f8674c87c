"""Weights for parity tests: redrawn at unit scale, so that a mix-up shows above the tolerance.

A fresh model's weights are small (std 0.02): attention scores are nearly equal and norms
are all ones, so a RoPE, norm or layout mistake changes the logits by less than round-off.
Matrices ~ N(0, 1/fan_in) give O(1) activations and attention scores; norms get distinct
weights around 1.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def redraw_at_unit_scale(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 1:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model
