"""The data position (a count of consumed blocks) resumes the exact global batches, row for
row in their order, for any worker count and micro-batch split, also where the epoch's length
is only learnt at the end of the first pass (data.mode=stream) and the resume lands past it."""

from __future__ import annotations

import pytest
import torch

from raylm.batches import RankBatches, reshuffled

N, G = 23, 4  # 5 full global batches an epoch, 3 blocks left over
STEPS = 17  # past three epoch boundaries
ROWS = {"tokens": torch.arange(N)[:, None].repeat(1, 3)}
PASSES = [{k: v[i:i + G] for k, v in ROWS.items()} for i in range(0, N, G)]


def _global_batches(world: int, micro: int, consumed: int, steps: int, blocks_per_epoch) -> list[list[int]]:
    """Each step's global batch, rows in their global order, put together from every rank."""
    its = [iter(RankBatches(lambda e: iter(reshuffled(PASSES, 7, e)), G, micro, r, world, blocks_per_epoch,
                            consumed, "cpu")) for r in range(world)]
    out = []
    for _ in range(steps):
        rows = {}
        for r, it in enumerate(its):
            for a, mb in enumerate(next(it)):
                for j, block in enumerate(mb["tokens"][:, 0].tolist()):
                    rows[(a * world + r) * micro + j] = block
        assert sorted(rows) == list(range(G))
        out.append([rows[i] for i in range(G)])
    return out


@pytest.mark.parametrize("blocks_per_epoch", [N, None], ids=["prepared", "stream"])
@pytest.mark.parametrize("world,micro", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)])
def test_a_resume_at_any_step_gives_the_uninterrupted_batches(blocks_per_epoch, world, micro):
    whole = _global_batches(1, G, 0, STEPS, blocks_per_epoch)
    for k in (1, 4, 5, 6, 11, 15):  # 5, 10 and 15 are epoch boundaries
        assert _global_batches(world, micro, k * G, STEPS - k, blocks_per_epoch) == whole[k:], k
    epochs = [sorted(b for batch in whole[e * 5:(e + 1) * 5] for b in batch) for e in range(3)]
    assert all(len(set(e)) == 20 for e in epochs)  # no block twice within an epoch
    assert epochs[0] == list(range(20)) and epochs[1] != epochs[2]  # later epochs leave out other blocks
