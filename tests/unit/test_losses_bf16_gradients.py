"""chunked_cross_entropy on bf16 hidden states and head (FSDP2's bf16 compute copies) gives the
gradients of the plain bf16 path, logits -> float() -> F.cross_entropy, to bf16 round-off:
ignored rows, a last chunk shorter than the others and the z-loss included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raylm.losses import chunked_cross_entropy

N, D, V = 37, 16, 50  # N prime: every chunk size below leaves a shorter last chunk


def _grads(fn, hidden, weight):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w)
    (loss * (1 / 29)).backward()  # a mean's upstream gradient, as train_step scales by 1/count
    return loss.detach(), h.grad.float(), w.grad.float()


@pytest.mark.parametrize("chunk", [1, 8, 36, 0])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_bf16_gradients_match_the_plain_bf16_path(chunk, z_loss):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, D, generator=g).bfloat16()
    weight = (torch.randn(V, D, generator=g) * 0.5).bfloat16()
    targets = torch.randint(0, V, (N,), generator=g)
    ignored = [0, 7, 8, 36]
    targets[ignored] = -100

    def plain(h, w):
        logits = F.linear(h, w).float()
        loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        return loss + z_loss * (torch.logsumexp(logits, -1).square() * (targets != -100)).sum()

    want = _grads(plain, hidden, weight)
    got = _grads(lambda h, w: chunked_cross_entropy(h, w, targets, chunk, z_loss=z_loss), hidden, weight)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)  # fp32 sums of the same fp32 logits
    for name, a, b in zip(("d hidden", "d weight"), got[1:], want[1:]):
        # a few bf16 steps (2^-8 relative) of the largest entry: rounding, never a wrong term
        torch.testing.assert_close(a, b, rtol=2 ** -6, atol=2 ** -6 * float(b.abs().max()), msg=name)
    assert torch.count_nonzero(got[1][ignored]) == 0  # ignored rows get no gradient
