"""Cross-entropy over a large vocabulary without materialising every logit at once.

For small models with big vocabularies the logits are the largest activation of the whole
step: gpt2-124m at micro-batch 16 x 1024 tokens has N = 16,384 rows of V = 50,304 logits,
1.6 GB in bf16, then an fp32 copy for the softmax (3.3 GB) and its fp32 gradient (3.3 GB),
about what all 12 blocks together keep for backward (an estimate: ~20 bf16 values of width
d per token and block, ~0.5 GB a block). `chunked_cross_entropy` walks the rows in chunks,
so only chunk x V logits exist at a time.

It computes the gradients during the forward pass (the loss is a sum, so d loss / d logits
= softmax - onehot is known as soon as a chunk's logits are) and keeps the chunk's
contributions to d/d hidden and d/d weight; backward only scales them by the incoming
gradient. That costs the same three matmuls as the plain path (logits, and the two gradient
matmuls), with no recomputation, which `torch.utils.checkpoint` per chunk would add (a
fourth matmul: +9% of gpt2-124m's FLOPs at seq 1024, whose head is 27% of them). The price:
no double backward, and d/d hidden (N x d) is held from forward to backward.

Precision: logits, log-softmax, z-loss and d/d logits are fp32. With bf16 inputs on CUDA the
head matmul writes fp32 directly from its fp32 accumulator (`out_dtype`), which is more
exact than the plain path's bf16 logits; d/d weight is accumulated over chunks in fp32.

Padded vocabulary: the softmax runs over every row of the head, all `model.vocab_size` of
them, here as in the plain path (`raylm.objectives.NextTokenObjective`). With
model.vocab_size=0 that is the tokenizer's size rounded up to a multiple of 64, so the
padding rows, which no target names, are in the normaliser: the training loss, and the
evaluation loss and bits-per-byte computed from it, are those of a distribution over the
padded vocabulary. Training pushes those rows down: 2,000 ids padded to 2,048 hold about
2.3% of the probability at init (log(2048/2000) = 0.024 nats on the loss) and about 5e-5
after 200 steps of a 2-layer, dim-64 model. `raylm.eval`'s bits-per-byte and
log-likelihood scores are over the padded vocabulary too; generation and serving
(`raylm.generate`, `raylm.serve.engine`) and the HF/GGUF exports normalise over the
tokenizer's ids instead.
"""

from __future__ import annotations

import warnings

import torch

_F32 = torch.float32
_cuda_out_dtype = True  # torch.mm(..., out_dtype=fp32) for bf16/fp16 on CUDA, until it fails once
_cuda_addmm_out_dtype = True  # torch.addmm(..., out_dtype=fp32, out=acc) likewise


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. bf16/fp16 inputs on CUDA keep the matmul's fp32 accumulator as the
    output (no bf16 rounding of logits, no fp32 copy of the inputs); elsewhere, upcast the
    product."""
    global _cuda_out_dtype
    if a.dtype == _F32:
        return a @ b
    if a.is_cuda and _cuda_out_dtype:
        try:
            return torch.mm(a, b, out_dtype=_F32)
        except torch.OutOfMemoryError:  # a RuntimeError, but no sign of a missing kernel
            raise
        # TypeError: a torch without the keyword (older than the tested one, see pyproject);
        # RuntimeError: a build or GPU without the mixed-dtype kernel. Either way the same
        # math follows, with bf16-rounded logits.
        except (RuntimeError, TypeError) as e:
            _cuda_out_dtype = False
            warnings.warn(f"torch.mm(out_dtype=float32) failed ({e}); upcasting bf16 products instead")
    return (a @ b).float()


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 `acc`, in place: the product is accumulated into acc by the
    matmul itself, with no [m, n] fp32 temporary (V x d for d/d weight, every chunk). The same
    sum as `acc += _mm_f32(a, b)`: fp32 inputs add their fp32 product; bf16/fp16 ones on CUDA
    add the matmul's fp32 accumulator (out_dtype); elsewhere the bf16-rounded product."""
    global _cuda_addmm_out_dtype
    if a.dtype == _F32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        if _cuda_addmm_out_dtype:
            try:
                torch.addmm(acc, a, b, out_dtype=_F32, out=acc)
                return
            except torch.OutOfMemoryError:
                raise
            # A torch or GPU without the mixed-dtype addmm (its checks run before any write):
            # the old sum, through an fp32 temporary, for this call and every later one (not
            # the bf16-rounded product below, which would make chunks after the first differ).
            except (RuntimeError, TypeError) as e:
                _cuda_addmm_out_dtype = False
                warnings.warn(f"torch.addmm(out_dtype=float32, out=...) failed ({e}); adding a float32 product instead")
        acc += _mm_f32(a, b)
        return
    acc.add_(a @ b)  # the bf16 product, promoted to fp32 by the add: no fp32 copy of it


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float):
    """Summed CE (+ z-loss) of fp32 logits [c, V]; also returns (valid mask, safe targets, lse)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)  # any in-range index; its row is masked out
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, nll, 0).sum()
    if z_loss:
        # PaLM's z-loss: z * log(Z)^2 per counted row keeps the softmax normaliser near 1.
        loss = loss + z_loss * torch.where(valid, lse.square(), 0).sum()
    return loss, valid, safe, lse


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, z_loss: float):
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=_F32, device=weight.device)
        total = torch.zeros((), dtype=_F32, device=hidden.device)
        wt = weight.t()
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s:s + chunk_size]
            logits = _mm_f32(h, wt)  # [c, V] fp32; chunk x V tensors live only in this iteration
            loss, valid, safe, lse = _chunk_loss(logits, targets[s:s + chunk_size], ignore_index, z_loss)
            total += loss
            # d loss / d logits = softmax * (1 + 2 z lse) - onehot(target) on counted rows, in place.
            g = logits.sub_(lse[:, None]).exp_()
            g.mul_(torch.where(valid, 1 + 2 * z_loss * lse, 0)[:, None])
            g.scatter_add_(1, safe[:, None], -valid.to(_F32)[:, None])
            g = g.to(hidden.dtype)  # the dtype the plain path's head backward runs in
            grad_h[s:s + chunk_size] = g @ weight
            _addmm_f32_(grad_w, g.t(), h)  # in place: no V x d fp32 temporary a chunk
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                          ignore_index: int = -100, z_loss: float = 0.0) -> torch.Tensor:
    """sum over rows of CE(hidden @ weight.T, targets) (+ z_loss * sum log(Z)^2), rows whose
    target is `ignore_index` excluded; the same value and gradients as
    `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`.

    hidden [N, d] and weight [V, d] share a dtype; the result is an fp32 scalar. Peak extra
    memory is chunk_size x V fp32 (chunk_size <= 0 means all rows at once)."""
    if hidden.ndim != 2 or weight.ndim != 2 or targets.shape != hidden.shape[:1] or hidden.dtype != weight.dtype:
        raise ValueError(f"expected hidden [N, d], weight [V, d] of one dtype, targets [N]; got "
                         f"{tuple(hidden.shape)} {hidden.dtype}, {tuple(weight.shape)} {weight.dtype}, "
                         f"{tuple(targets.shape)}")
    chunk_size = chunk_size if chunk_size > 0 else max(1, hidden.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCE.apply(hidden, weight, targets, chunk_size, ignore_index, float(z_loss))
    total = torch.zeros((), dtype=_F32, device=hidden.device)  # evaluation: no gradients to keep
    for s in range(0, hidden.shape[0], chunk_size):
        logits = _mm_f32(hidden[s:s + chunk_size], weight.t())
        total += _chunk_loss(logits, targets[s:s + chunk_size], ignore_index, z_loss)[0]
    return total


def lm_head_weight(model) -> torch.Tensor:
    """The [V, d] matrix `Transformer.logits` multiplies by: the head, or the tied embedding."""
    return model.output.weight if model.output is not None else model.tok_embeddings.weight


def chunked_lm_loss(model, tokens: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                    z_loss: float = 0.0, doc_sep: int | None = None) -> torch.Tensor:
    """Summed next-token loss of a raylm `Transformer` (plain or FSDP2-sharded) via
    `hidden_states` + `chunked_cross_entropy`: what `NextTokenObjective.loss_sum` computes."""
    _fsdp_hidden_states(model)
    h = model.hidden_states(tokens, doc_sep=doc_sep)
    # An FSDP2 root keeps its parameters (embedding, head) unsharded after forward
    # (reshard_after_forward=False in raylm.parallel), so this is the gathered compute copy.
    return chunked_cross_entropy(h.flatten(0, 1), lm_head_weight(model), targets.flatten(), chunk_size,
                                 z_loss=z_loss)


def _fsdp_hidden_states(model) -> None:
    """FSDP2 gathers the root's parameters in hooks around `__call__` only; calling
    `hidden_states` directly needs it registered as a forward method (once per model)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule) and not getattr(model, "_raylm_hidden_states_hooked", False):
        register_fsdp_forward_method(model, "hidden_states")
        model._raylm_hidden_states_hooked = True
