"""Training's bookkeeping checked against independent counts: FLOPs per token against torch's
own FLOP counter, the loss units of document-masked packed blocks against a count over the
documents, DPO and IPO losses against hand-computed log-probabilities, and a run record read
back as the config that wrote it."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from raylm.config import Config, DataConfig, ModelConfig, TrainConfig, to_dict
from raylm.metrics import flops_per_token
from raylm.model import build_model
from raylm.objectives import IGNORE, DPOObjective, NextTokenObjective
from raylm.packing import BlockPacker
from raylm.record import load_record, write_record


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_is_what_torch_counts_for_a_training_step(tie):
    """6N + 12LdT against torch's FLOP counter over one forward and backward. The math attention
    kernel is used so that QK^T and AV are counted (the fused CPU kernel is not): they are the
    12LdT term, the full T x T product as PaLM counts it. The formula's N also holds the norm
    weights, which are no matmul: 6 FLOPs a weight are its only excess over torch's count."""
    cfg = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      tie_embeddings=tie)
    model = build_model(cfg, seed=0)
    B, T = 2, 16
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, _ = model(torch.randint(0, 128, (B, T)))
        logits.float().sum().backward()
    counted = counter.get_total_flops() / (B * T)
    norm_weights = cfg.n_layers * 2 * cfg.dim + cfg.dim
    assert flops_per_token(cfg, T) == counted + 6 * norm_weights
    attention = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(k)) / (B * T)
    assert attention == 12 * cfg.n_layers * cfg.dim * T


@pytest.mark.parametrize("block_len", [2, 3, 5, 8])
def test_document_masked_blocks_predict_no_documents_first_token(block_len):
    """Packed blocks of random documents (empty ones too): with document masking, a target is a
    loss unit unless its input is EOS, so no document's first token is predicted from the
    document before it, whether the two meet inside a block or across a block's first position,
    and every other target counts."""
    eos = 0
    rng = np.random.default_rng(block_len)
    docs = [rng.integers(1, 40, int(rng.integers(0, 9))).astype(np.int32) for _ in range(40)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    blocks = torch.from_numpy(BlockPacker(block_len, eos).add(np.concatenate(docs), offsets).astype(np.int64))
    objective = NextTokenObjective(doc_sep=eos)
    targets = objective._targets({"tokens": blocks})
    after_eos = blocks[:, :-1] == eos
    assert (targets[after_eos] == IGNORE).all()
    assert (targets[~after_eos] == blocks[:, 1:][~after_eos]).all()
    assert objective.count({"tokens": blocks}) == int((~after_eos).sum())
    assert objective.tokens({"tokens": blocks}) == blocks[:, :-1].numel()  # no padding in packed blocks


class UniformLM(torch.nn.Module):
    """Every token has log-probability -ln 3 (three ids, equal logits)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        return (torch.zeros(*tokens.shape, 3) + self.bias,)


PAIR = {"chosen": torch.tensor([[0, 1, 2, 1]]), "chosen_mask": torch.tensor([[False, False, True, True]]),
        "rejected": torch.tensor([[0, 1, 2, 0]]), "rejected_mask": torch.tensor([[False, True, True, True]]),
        "ref_chosen_logp": torch.tensor([-3.0]), "ref_rejected_logp": torch.tensor([-6.0])}


@pytest.mark.parametrize("loss, eps, average", [("sigmoid", 0.0, False), ("sigmoid", 0.2, False),
                                                ("ipo", 0.0, False), ("ipo", 0.0, True)])
def test_dpo_and_ipo_losses_by_hand(loss, eps, average):
    """Policy log-probabilities are -ln 3 a response token (2 chosen, 3 rejected); the reference
    columns are sums. Δ = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)), on sums, or on
    per-token means of policy and reference alike (`average_logprobs`, TRL's IPO)."""
    beta, ln3 = 0.5, math.log(3)
    pc, pr, rc, rr = (-ln3, -ln3, -3 / 2, -6 / 3) if average else (-2 * ln3, -3 * ln3, -3.0, -6.0)
    delta = (pc - rc) - (pr - rr)
    if loss == "ipo":
        want = (delta - 1 / (2 * beta)) ** 2
    else:
        want = (1 - eps) * math.log1p(math.exp(-beta * delta)) + eps * math.log1p(math.exp(beta * delta))
    objective = DPOObjective(beta, loss, eps, average_logprobs=average)
    assert objective.count(PAIR) == 1
    assert float(objective.loss_sum(UniformLM(), PAIR).detach()) == pytest.approx(want, rel=1e-6)


def test_a_run_record_reads_back_as_the_config_that_wrote_it(tmp_path):
    cfg = Config(storage=str(tmp_path), name="rec", seed=7,
                 data=replace(DataConfig(), redact_pii=("email",), seq_len=64),
                 train=replace(TrainConfig(), lr=3e-4, z_loss=1e-4, global_batch_size=8, micro_batch_size=2))
    uri = write_record(cfg, "pretrain")
    stage, back = load_record(uri)
    assert stage == "pretrain"
    assert back == cfg and to_dict(back) == to_dict(cfg)
