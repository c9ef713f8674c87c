"""Where the training loop's batches live: the kept first pass and the validation rows stay in
host memory, and each micro-batch goes to the training device only as it is used. On CPU the
device is given explicitly as `meta`, a device other than the host's, so a tensor's placement
shows which side of the copy it is on. Also: train_step's counts are exact integers."""

from __future__ import annotations

from dataclasses import replace

import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.objectives import NextTokenObjective
from raylm.batches import DeviceBatches, RankBatches, rank_val_batches
from raylm.train import make_optimizer, train_step

META = torch.device("meta")
TC = TrainConfig(micro_batch_size=2, global_batch_size=8, eval_batches=3)
N, G = 24, 8


def _kept_pass() -> list[dict]:
    """Three global batches on the host, as `train_worker` keeps a small first pass; row i
    holds the value i, so a row's identity is its first token."""
    rows = torch.arange(N, dtype=torch.int32)[:, None].expand(N, 5).contiguous()
    return [{"tokens": rows[i:i + G], "loss_mask": torch.ones(G, 5, dtype=torch.uint8)} for i in range(0, N, G)]


def test_rank_batches_move_only_this_ranks_micro_batches(monkeypatch):
    import raylm.batches

    moved = []
    real = raylm.batches.to_device
    monkeypatch.setattr(raylm.batches, "to_device", lambda b, d: moved.append(len(b["tokens"])) or real(b, d))
    kept = _kept_pass()
    before = [{k: v.clone() for k, v in b.items()} for b in kept]
    rb = RankBatches(lambda epoch: iter(kept), G, 2, rank=1, world=2, blocks_per_epoch=N, consumed=0, device=META)
    step = next(iter(rb))
    assert moved == [2, 2]  # two micro-batches of 2 rows: never the global batch of 8 (others' rows)
    assert len(step) == G // (2 * 2)
    for mb in step:  # on the device, in training dtypes, this rank's rows only
        assert mb["tokens"].device == META and mb["tokens"].dtype == torch.long and mb["tokens"].shape == (2, 5)
        assert mb["loss_mask"].device == META and mb["loss_mask"].dtype == torch.bool
    # The kept batches are where they were, untouched (no column replaced by a device copy).
    assert all(v.device.type == "cpu" for b in kept for v in b.values())
    assert all(torch.equal(b[k], a[k]) and b[k].dtype == a[k].dtype for a, b in zip(before, kept) for k in a)


def test_rank_batches_rows_match_on_the_host():
    """The same rows as before the change, checked on the host device: rank r of w takes rows
    [(a * w + r) * micro, ...) of each global batch."""
    kept = _kept_pass()
    rb = RankBatches(lambda epoch: iter(kept), G, 2, rank=1, world=2, blocks_per_epoch=N, consumed=0,
                     device=torch.device("cpu"))
    step = next(iter(rb))
    assert [r for mb in step for r in mb["tokens"][:, 0].tolist()] == [2, 3, 6, 7]


def test_validation_rows_stay_on_the_host_until_used():
    rows = {"tokens": torch.arange(40, dtype=torch.int32)[:, None].expand(40, 5)}
    # eval_batches=3 global batches of 8: 24 rows, 12 a rank, in micro-batches of 2.
    val = rank_val_batches(rows, TC, rank=0, world=2, device=META)
    assert isinstance(val, DeviceBatches) and len(val) == 6
    assert all(v.device.type == "cpu" for b in val.host for v in b.values())  # the kept rows
    used = list(val)
    assert len(used) == 6 and all(mb["tokens"].device == META and mb["tokens"].dtype == torch.long for mb in used)
    assert all(v.device.type == "cpu" for b in val.host for v in b.values())  # still there after use
    assert len(list(val)) == 6  # iterable again: every evaluation moves them anew


# --------------------------------------------------------------------------- exact counts


class _CountOnly(NextTokenObjective):
    """The real objective's counts on a batch of 2^24 + 1 targets; its loss a cheap stand-in,
    since the model never sees these 16.8M tokens."""

    def loss_sum(self, model, batch):
        return sum(p.sum() for p in model.parameters()) * 0.0 + 1.0


def test_train_step_counts_past_2_to_the_24_exactly():
    """A float32 count rounds 2^24 + 1 down to 2^24; the step's counts are int64."""
    n = 2**24 + 1
    batch = {"tokens": torch.zeros(1, n, dtype=torch.int32), "targets": torch.zeros(1, n, dtype=torch.int32)}
    objective = _CountOnly()
    assert objective.count(batch) == n
    model = build_model(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, max_seq_len=8), seed=0)
    optimizer = make_optimizer(model, replace(TC, lr=1e-3), torch.device("cpu"))
    stats = train_step(model, optimizer, [batch, batch], objective, lr=1e-3, grad_clip=1.0)
    assert stats.count == 2 * n and stats.tokens == 2 * n
