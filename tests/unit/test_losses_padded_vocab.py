"""The training loss normalises over every row of the head, the rows that pad the vocabulary
past the tokenizer's included (documented in raylm.losses and Transformer.forward); sampling
slices them off. Pins that documented behaviour for the plain and the chunked loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.config import ModelConfig
from raylm.model import build_model
from raylm.objectives import NextTokenObjective

REAL = 100  # the tokenizer's ids; model.vocab_size=0 rounds them up to 128
CFG = ModelConfig(dim=32, n_layers=1, n_heads=4, max_seq_len=16, ffn_multiple_of=16).with_vocab(REAL)


def test_loss_softmax_includes_the_padding_rows():
    assert CFG.vocab_size == 128
    model = build_model(CFG, seed=0)
    tokens = torch.randint(0, REAL, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0].float().flatten(0, 1)
        targets = tokens[:, 1:].flatten()
        padded = F.cross_entropy(logits, targets, reduction="sum")
        real_only = F.cross_entropy(logits[:, :REAL], targets, reduction="sum")
        for chunk in (0, 5):
            got = NextTokenObjective(chunk_size=chunk).loss_sum(model, {"tokens": tokens})
            torch.testing.assert_close(got, padded)
    # At init the padding rows hold about 28/128 of the probability: a visible difference.
    assert padded - real_only > 0.1 * targets.numel()
