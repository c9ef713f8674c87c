"""What a training stage optimises: next-token prediction (pre-training), SFT and DPO.

Each follows `raylm.train.Objective`: `count(batch)` is the number of loss units in the
batch (tokens for pre-training, assistant tokens for SFT, preference pairs for DPO) and
`loss_sum(model, batch)` the sum of their losses, so `train_step` and `evaluate` normalise
over micro-batches and ranks the same way for every stage; `tokens(batch)` counts the real
(non-padding) tokens the forward pass processes, for throughput and MFU. Only the batch
columns differ:

  pre-training  tokens (B, T+1) long: packed blocks.
  SFT  tokens (B, T+1) long, loss_mask (B, T+1) bool: True on assistant target tokens (the
       reply and its closing <|end|>, as `Tokenizer.encode_chat` marks them).
  DPO  chosen, chosen_mask, rejected, rejected_mask: the same pair of columns for each
       response of a preference pair, prompt included; optionally ref_chosen_logp and
       ref_rejected_logp (B,) fp32, the reference model's log-probabilities, precomputed
       by `reference_logprobs` so that training never holds the reference model.

A mask entry at position t says whether token t is a target: it is predicted from tokens
< t, so position 0 is never one. Padding (any id) carries mask False.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from raylm.errors import ConfigError, DataError
from raylm.losses import chunked_lm_loss, lm_head_weight

IGNORE = -100  # the ignore_index of NextTokenObjective and raylm.losses

# --------------------------------------------------------------------------- next token


@dataclass(frozen=True)
class NextTokenObjective:
    """Causal LM loss on packed blocks; targets of -100 (SFT prompt tokens) are ignored.

    chunk_size > 0 computes the head and the loss over that many rows at a time
    (raylm.losses), never holding the full (tokens x vocab) logits: the same value with far
    less memory when the vocabulary is large. doc_sep (the EOS id) turns on document masking
    (see raylm.model): attention stays within each packed document, and the target after a
    separator, the next document's first token, is not a loss term, since nothing the model
    may see predicts it."""

    z_loss: float = 0.0
    chunk_size: int = 0
    doc_sep: int | None = None

    def count(self, batch):
        return int((self._targets(batch) != IGNORE).sum())

    def tokens(self, batch) -> int:
        return int(batch["tokens"].numel() if "targets" in batch else batch["tokens"][:, :-1].numel())

    def _targets(self, batch):
        if "targets" in batch:
            return batch["targets"]
        targets = batch["tokens"][:, 1:]
        if self.doc_sep is not None:
            targets = targets.masked_fill(batch["tokens"][:, :-1] == self.doc_sep, IGNORE)
        return targets

    def loss_sum(self, model, batch):
        targets = self._targets(batch)
        tokens = batch["tokens"][:, :-1] if "targets" not in batch else batch["tokens"]
        if self.chunk_size:
            return chunked_lm_loss(model, tokens, targets, self.chunk_size, self.z_loss, doc_sep=self.doc_sep)
        logits, _ = model(tokens, doc_sep=self.doc_sep)
        logits = logits.float().flatten(0, 1)
        flat = targets.flatten()
        loss = F.cross_entropy(logits, flat, ignore_index=IGNORE, reduction="sum")
        if self.z_loss:
            # PaLM's z-loss keeps log(sum(exp(logits))) near 0, so logits cannot drift upward.
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + self.z_loss * (lse.square() * (flat != IGNORE)).sum()
        return loss


# --------------------------------------------------------------------------- SFT


def sft_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SFT batch as NextTokenObjective's explicit-targets form: inputs tokens[:, :-1],
    targets tokens[:, 1:] with every non-target position set to the ignore index."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:].masked_fill(~mask[:, 1:].bool(), IGNORE)}


@dataclass(frozen=True)
class SFTObjective:
    """Next-token loss on assistant tokens only: the prompt is context, not something to
    imitate. The loss itself is pre-training's (NextTokenObjective: plain or chunked head,
    z-loss on counted positions only), fed targets with the ignore index off the mask."""

    z_loss: float = 0.0
    chunk_size: int = 0
    doc_sep: int | None = None  # packed conversations: attention stays within each one
    pad_id: int | None = None  # fills the end of a row no further conversation fits in

    def count(self, batch) -> int:
        return int(batch["loss_mask"][:, 1:].sum())

    def tokens(self, batch) -> int:
        inputs = batch["tokens"][:, :-1]
        return int(inputs.numel() if self.pad_id is None else (inputs != self.pad_id).sum())

    def loss_sum(self, model, batch) -> torch.Tensor:
        return NextTokenObjective(self.z_loss, self.chunk_size, self.doc_sep).loss_sum(model, sft_targets(batch))

    def metrics(self, model, batch) -> dict:
        """Assistant tokens (the loss's units; StepStats.count has the step's global total)
        and their share of the predicted tokens, which tells how much of each batch trains."""
        n = self.count(batch)
        return {"assistant_tokens": n, "assistant_fraction": n / max(1, batch["tokens"][:, 1:].numel())}


# --------------------------------------------------------------------------- log-probabilities


def sequence_logprobs(model, tokens: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """(B,) fp32: per sequence, the sum of log p(token t | tokens < t) over positions t whose
    mask is True (the response), under `model`.

    chunk_size 0 builds the full (B, T, V) logits and an fp32 copy: fine for small
    vocabularies, but at V = 50k, T = 1024 and 16 sequences (8 pairs) that is 3.3 GB of fp32
    logits plus its gradient. chunk_size > 0 (train.loss_chunk_size, a raylm Transformer)
    runs the head from the final hidden states over the masked positions alone, that many at
    a time, and keeps no logits for backward: each chunk's are computed again there
    (torch.utils.checkpoint). The same values, with chunk x V logits alive at a time, and
    no head work on prompts and padding."""
    targets, mask = tokens[:, 1:], loss_mask[:, 1:].bool()
    if chunk_size > 0:
        return _chunked_sequence_logprobs(model, tokens[:, :-1], targets, mask, chunk_size)
    logits = model(tokens[:, :-1])[0].float()
    picked = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, picked, 0.0).sum(-1)


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of `hidden` [c, d] under the head `weight` [V, d], fp32.
    The head as `Transformer.logits` computes it (then fp32), so both paths agree; autograd
    runs through it (raylm.losses' fp32-output matmul has no backward to rely on)."""
    logits = F.linear(hidden, weight).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _chunked_sequence_logprobs(model, inputs, targets, mask, chunk_size: int) -> torch.Tensor:
    """`sequence_logprobs` with chunk_size > 0. Under FSDP2 the hidden states and the head run
    in one registered forward method, so the head is gathered for them even on DPO's frozen
    reference, whose root reshards after each forward (a trained root stays gathered until
    its backward, where the recomputation reads it)."""
    if not isinstance(model, FSDPModule):
        return _head_sequence_logprobs(model, inputs, targets, mask, chunk_size)
    if getattr(model, "_raylm_sequence_logprobs", None) is None:  # once per model
        model._raylm_sequence_logprobs = types.MethodType(_head_sequence_logprobs, model)
        register_fsdp_forward_method(model, "_raylm_sequence_logprobs")
    return model._raylm_sequence_logprobs(inputs, targets, mask, chunk_size)


def _head_sequence_logprobs(model, inputs, targets, mask, chunk_size: int) -> torch.Tensor:
    # The class's hidden_states: this already runs as the model's forward (its FSDP hooks).
    h = type(model).hidden_states(model, inputs)
    weight = lm_head_weight(model)
    rows = mask.flatten().nonzero().squeeze(1)  # the masked positions: the head runs on these alone
    picked_h, picked_t = h.flatten(0, 1).index_select(0, rows), targets.flatten()[rows]
    grad = torch.is_grad_enabled() and (picked_h.requires_grad or weight.requires_grad)
    # An empty first chunk ties the result to the hidden states and the head even when nothing
    # is masked: backward still reaches every parameter, as the full-logits path's does.
    parts = [_token_logprobs(picked_h[:0], weight, picked_t[:0])]
    for s in range(0, len(rows), chunk_size):
        args = (picked_h[s:s + chunk_size], weight, picked_t[s:s + chunk_size])
        # No randomness in the head: nothing of the RNG state to stash and restore per chunk.
        parts.append(checkpoint(_token_logprobs, *args, use_reentrant=False, preserve_rng_state=False)
                     if grad else _token_logprobs(*args))
    seq = rows // targets.shape[1]  # each masked position's sequence
    return torch.zeros(targets.shape[0], dtype=torch.float32, device=h.device).index_add(0, seq, torch.cat(parts))


def _pad_width(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]), value=value)


def pair_logprobs(model, batch, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities from ONE forward pass over both halves
    stacked: half the kernel launches, and FSDP gathers the weights once, not twice.
    chunk_size: `sequence_logprobs`'."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    width = max(chosen.shape[1], rejected.shape[1])
    tokens = torch.cat([_pad_width(chosen, width, 0), _pad_width(rejected, width, 0)])
    mask = torch.cat([_pad_width(batch["chosen_mask"].bool(), width, False),
                      _pad_width(batch["rejected_mask"].bool(), width, False)])
    logp = sequence_logprobs(model, tokens, mask, chunk_size)
    return logp[:len(chosen)], logp[len(chosen):]


@torch.no_grad()
def reference_logprobs(reference_model, batch, chunk_size: int = 0) -> dict[str, torch.Tensor]:
    """The reference columns of a DPO batch, for a data pass to write once: training with
    them needs neither the reference model's memory nor its forward pass at every step."""
    chosen, rejected = pair_logprobs(reference_model, batch, chunk_size)
    return {"ref_chosen_logp": chosen, "ref_rejected_logp": rejected}


# --------------------------------------------------------------------------- DPO


@dataclass(frozen=True, eq=False)
class DPOObjective:
    """Direct preference optimisation on pairs (prompt, chosen, rejected).

    With Δ = [log π(chosen) - log π_ref(chosen)] - [log π(rejected) - log π_ref(rejected)]:
      sigmoid  -(1 - ε) log σ(βΔ) - ε log σ(-βΔ): DPO (Rafailov et al. 2023, eq. 7) for ε = 0;
               ε > 0 is conservative DPO (Mitchell 2023), which assumes a share ε of the
               labels flipped and so stops pushing Δ once βΔ reaches log((1 - ε) / ε).
      ipo      (Δ - 1/(2β))²: IPO (Azar et al. 2023, "A General Theoretical Paradigm to
               Understand Learning from Human Preferences", eq. 17, β standing for their τ),
               which regresses Δ to a finite target instead of driving it to infinity.
               TRL computes the same square, with log-probabilities averaged over response
               tokens for IPO; `average_logprobs=True` does that (for either loss).

    The reference comes from `reference` (a frozen model, run under no_grad; it is not the
    optimised model, so it is never in the optimizer) or, without one, from the batch
    columns ref_chosen_logp / ref_rejected_logp (`reference_logprobs`), which are always
    sums; averaging, when asked for, happens here, for policy and reference alike."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: torch.nn.Module | None = None
    average_logprobs: bool = False
    pad_id: int | None = None  # fills each response's row after its end
    # > 0: log-probabilities from the head over this many positions at a time, never the full
    # logits (train.loss_chunk_size; see sequence_logprobs), for the policy and a live reference.
    chunk_size: int = 0

    def __post_init__(self):
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"DPO loss {self.loss!r}: expected 'sigmoid' or 'ipo'")
        if self.beta <= 0:
            raise ConfigError(f"DPO beta must be > 0, got {self.beta}")
        # ε = 0.5 makes the loss symmetric in chosen and rejected: no preference is left.
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"DPO label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError("label_smoothing applies to the sigmoid loss only")

    def count(self, batch) -> int:
        return int(batch["chosen"].shape[0])

    def trainable(self, batch) -> int:
        """Pairs with a response token in either mask: a pair masked out on both sides has a
        constant loss (log 2 for sigmoid) and no gradient."""
        return int((batch["chosen_mask"][:, 1:].any(-1) | batch["rejected_mask"][:, 1:].any(-1)).sum())

    def tokens(self, batch) -> int:
        both = (batch["chosen"][:, :-1], batch["rejected"][:, :-1])
        return int(sum(x.numel() if self.pad_id is None else (x != self.pad_id).sum() for x in both))

    def _logratios(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy chosen, policy rejected, reference chosen, reference rejected), (B,) each."""
        pc, pr = pair_logprobs(model, batch, self.chunk_size)
        if self.reference is not None:
            ref = reference_logprobs(self.reference, batch, self.chunk_size)
        elif "ref_chosen_logp" in batch:
            ref = batch
        else:
            raise ConfigError("DPO needs a reference: pass reference= or add the ref_chosen_logp and "
                             "ref_rejected_logp columns (reference_logprobs)")
        rc, rr = ref["ref_chosen_logp"].float(), ref["ref_rejected_logp"].float()
        if self.average_logprobs:
            nc = batch["chosen_mask"][:, 1:].sum(-1).clamp(min=1)
            nr = batch["rejected_mask"][:, 1:].sum(-1).clamp(min=1)
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        return pc, pr, rc, rr

    def pair_losses(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-pair loss of the log-ratio difference Δ (see the class docstring)."""
        if self.loss == "ipo":
            return (delta - 1 / (2 * self.beta)).square()
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(self.beta * delta) - eps * F.logsigmoid(-self.beta * delta)

    def loss_sum(self, model, batch) -> torch.Tensor:
        pc, pr, rc, rr = self._logratios(model, batch)
        return self.pair_losses((pc - rc) - (pr - rr)).sum()

    @torch.no_grad()
    def metrics(self, model, batch) -> dict:
        """Batch means for logging: implicit rewards β·(log π - log π_ref) of each side, their
        margin, preference accuracy (chosen reward strictly above rejected: 0 while the policy
        is the reference) and the policy's log-probabilities; `pairs` weighs batches."""
        pc, pr, rc, rr = self._logratios(model, batch)
        chosen, rejected = self.beta * (pc - rc), self.beta * (pr - rr)
        return {"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                "reward_margin": float((chosen - rejected).mean()),
                "preference_accuracy": float((chosen > rejected).float().mean()),
                "logp_chosen": float(pc.mean()), "logp_rejected": float(pr.mean()), "pairs": len(pc)}


# --------------------------------------------------------------------------- batch columns


def _stack(rows: Sequence[tuple[list[int], list[bool]]], width: int | None, pad_id: int):
    """(ids, mask) rows right-padded to `width` (default: the longest) with pad_id / False."""
    longest = max(len(ids) for ids, _ in rows)
    width = width or longest
    if longest > width:
        raise DataError(f"a sequence of {longest} tokens does not fit the width {width}")
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, m) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return tokens, mask


def _prompt_messages(record: dict) -> list[dict]:
    prompt = record["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def sft_batch(tokenizer, records: Sequence[dict], width: int | None = None) -> dict[str, torch.Tensor]:
    """SFT columns from records with `messages`, or with `prompt` and `completion`. Right
    padding is harmless: causal attention never lets a position see the pads after it."""
    rows = []
    for r in records:
        messages = r["messages"] if "messages" in r else \
            [*_prompt_messages(r), {"role": "assistant", "content": r["completion"]}]
        rows.append(tokenizer.encode_chat(messages))
    tokens, mask = _stack(rows, width, tokenizer.pad_id)
    return {"tokens": tokens, "loss_mask": mask}


def dpo_batch(tokenizer, records: Sequence[dict], width: int | None = None) -> dict[str, torch.Tensor]:
    """DPO columns from {prompt, chosen, rejected} records (prompt: a user message or a
    list of messages); both sides padded to one width."""
    from raylm.chat_data import encode_response

    sides = {side: [encode_response(tokenizer, _prompt_messages(r), r[side]) for r in records]
             for side in ("chosen", "rejected")}
    width = width or max(len(ids) for rows in sides.values() for ids, _ in rows)
    out = {}
    for side, rows in sides.items():
        out[side], out[f"{side}_mask"] = _stack(rows, width, tokenizer.pad_id)
    return out


# --------------------------------------------------------------------------- choosing one


def check_dpo_train_settings(tc) -> None:
    """train.* settings DPO cannot honour, refused rather than dropped without a word
    (raylm.config.dpo_train_refusal; Config.validate checks it at load too)."""
    from raylm.config import dpo_train_refusal

    refusal = dpo_train_refusal(tc)
    if refusal:
        raise ConfigError(refusal)


def make_objective(cfg, manifest: dict, reference: torch.nn.Module | None = None):
    """The objective of a run: its stage (cfg.stage) and the prepared data's special ids.
    SFT rows always pack conversations with document masking; pre-training does when
    data.document_mask is on. DPO takes its reference from `reference` (a frozen model) or
    from the batches' precomputed columns (dpo.precompute_reference)."""
    tc = cfg.train
    sep = manifest["eos_id"]
    if cfg.stage == "sft":
        return SFTObjective(tc.z_loss, tc.loss_chunk_size, doc_sep=sep, pad_id=manifest.get("pad_id"))
    if cfg.stage == "dpo":
        check_dpo_train_settings(tc)
        d = cfg.dpo
        return DPOObjective(d.beta, d.loss, d.label_smoothing, reference, pad_id=manifest.get("pad_id"),
                            chunk_size=tc.loss_chunk_size)
    return NextTokenObjective(tc.z_loss, tc.loss_chunk_size, sep if cfg.data.document_mask else None)
