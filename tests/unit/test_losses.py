"""chunked_cross_entropy computes what the plain logits -> F.cross_entropy path computes:
the same summed loss and the same gradients w.r.t. the hidden states and the head weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raylm.losses import chunked_cross_entropy

N, D, V = 37, 16, 50  # N prime: no chunk size below divides it
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(seed=0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = -100
    return hidden, weight, targets


def _plain(hidden, weight, targets, z_loss=0.0):
    logits = F.linear(hidden, weight).float()
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * (lse.square() * (targets != -100)).sum()
    return loss


def _value_and_grads(fn, hidden, weight, targets, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    (loss * 0.37).backward()  # a non-unit upstream gradient: backward must scale by it
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 37, 64, 0])
@pytest.mark.parametrize("ignored", [(), (0, 3, 4, 36)])
def test_matches_plain_cross_entropy(chunk, ignored):
    hidden, weight, targets = _inputs(ignored=ignored)
    ref = _value_and_grads(_plain, hidden, weight, targets)
    got = _value_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk), hidden, weight, targets)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    if ignored:  # ignored rows get no gradient at all
        assert torch.count_nonzero(got[1][list(ignored)]) == 0


@pytest.mark.parametrize("chunk", [6, 37])
def test_z_loss_matches_direct_computation(chunk):
    hidden, weight, targets = _inputs(seed=1, ignored=(2, 10))
    hidden = hidden * 4  # larger logits, so log(Z) and the z-term are far from zero
    z = 1e-2
    ref = _value_and_grads(_plain, hidden, weight, targets, z_loss=z)
    got = _value_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk, z_loss=z), hidden, weight, targets)
    without = _plain(hidden, weight, targets)
    assert ref[0] - without > 1e-3  # the z-term is really part of the comparison
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_no_grad_path_and_all_ignored():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, 10),
                                   _plain(hidden, weight, targets), **TOL)
    ignored = torch.full((N,), -100)
    h = hidden.clone().requires_grad_()
    loss = chunked_cross_entropy(h, weight, ignored, 10)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(h.grad) == 0


def test_bf16_inputs_give_fp32_loss_close_to_fp32():
    hidden, weight, targets = _inputs(seed=2)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = chunked_cross_entropy(h, w, targets, 8)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = _plain(h.detach().float(), w.detach().float(), targets)
    torch.testing.assert_close(loss, ref, atol=0.05 * N, rtol=0.02)


def test_shape_errors():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_cross_entropy(hidden[None], weight, targets, 8)
    with pytest.raises(ValueError, match="one dtype"):
        chunked_cross_entropy(hidden.double(), weight, targets, 8)
