"""Epochs of an in-memory training set (`reshuffled`, train_local, the kept pass of Ray
workers): every block is trained, and a block count still maps to one position."""

import collections

import numpy as np
import pytest
import torch

from raylm.batches import RankBatches, reshuffled
from raylm.config import load_config

N, G = 40, 16  # 2 full global batches an epoch, 8 blocks over
CPU = torch.device("cpu")


def _rows(n=N) -> torch.Tensor:
    # Row i holds the value i everywhere, so a row's identity is its first token.
    return torch.arange(n, dtype=torch.int32)[:, None].expand(n, 5).contiguous()


def _prepared(n=N) -> list[dict]:
    """The set as the Ray workers and train_local keep it: global batches, the last one short."""
    rows = _rows(n)
    return [{"tokens": rows[i:i + G], "loss_mask": rows[i:i + G] % 2 == 0} for i in range(0, n, G)]


def _ids(batch) -> list[int]:
    return batch["tokens"][:, 0].tolist()


def test_each_later_epoch_permutes_all_blocks_and_leaves_a_different_remainder():
    kept = _prepared()
    first = reshuffled(kept, 7, 0)
    assert [_ids(b) for b in first] == [list(range(16)), list(range(16, 32))]  # the first epoch is unchanged
    left = []
    for epoch in range(1, 7):
        e = reshuffled(kept, 7, epoch)
        assert [len(b["tokens"]) for b in e] == [G] * (N // G)  # an epoch's length never changes
        assert all(torch.equal(b["loss_mask"], b["tokens"] % 2 == 0) for b in e)  # columns stay aligned
        used = [r for b in e for r in _ids(b)]
        assert len(set(used)) == len(used)
        left.append(frozenset(range(N)) - set(used))
        assert _ids(e[0]) == _ids(reshuffled(kept, 7, epoch)[0])  # a function of (seed, epoch)
    assert len(set(left)) == len(left)  # which blocks wait changes every epoch
    assert frozenset().union(*[frozenset(range(N)) - x for x in left]) == frozenset(range(N))


def test_no_block_is_left_out_for_good_over_six_epochs():
    """Through RankBatches, as fit takes them: six epochs of full global batches train every block."""
    kept = _prepared()
    rb = RankBatches(lambda e: iter(reshuffled(kept, 0, e)), G, 4, 0, 1, N, 0, CPU)
    it, seen = iter(rb), collections.Counter()
    for _ in range(6 * (N // G)):
        seen.update(r for mb in next(it) for r in _ids(mb))
    assert sorted(seen) == list(range(N))
    assert sum(seen.values()) == 6 * (N // G) * G


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 4)])
def test_resume_on_another_worker_count_continues_with_the_next_blocks(k, before, after):
    """A block count maps to the same (epoch, step) of the same order: a run stopped after k
    steps and resumed on another number of workers trains what the uninterrupted one does."""
    kept = _prepared()

    def steps(world, n, consumed):
        its = [iter(RankBatches(lambda e: iter(reshuffled(kept, 3, e)), G, 2, r, world, N, consumed, CPU))
               for r in range(world)]
        out = []
        for _ in range(n):
            per_rank = [next(it) for it in its]
            out.append(sorted(r for mbs in per_rank for mb in mbs for r in _ids(mb)))
        return out

    whole = steps(before, 10, 0)
    assert steps(after, 10 - k, k * G) == whole[k:]


def test_train_local_trains_every_block_across_epochs(tmp_path, monkeypatch):
    """train_local's own epochs (not a copy of them): blocks after the last full global batch
    of the set are trained in later epochs."""
    import raylm.train as T

    got = []
    monkeypatch.setattr(T, "fit", lambda cfg, model, opt, objective, batches, *a, **k: got.append(batches) or {})
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=epochs", "model.vocab_size=64", "model.dim=32",
                                 "model.n_layers=1", "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16",
                                 "train.micro_batch_size=4", f"train.global_batch_size={G}"])
    blocks = np.repeat(np.arange(N, dtype=np.int32)[:, None], 17, axis=1)
    T.train_local(cfg, blocks, blocks[:8], log=lambda *_: None)
    it, seen = iter(got[0]), set()
    first = [r for mb in next(it) + next(it) for r in _ids(mb)]
    assert first == list(range(32))  # the first epoch keeps the prepared order
    for _ in range(5 * (N // G)):
        seen.update(r for mb in next(it) for r in _ids(mb))
    assert seen == set(range(N))


class _Shard:
    """A Ray Data shard as train_worker reads it: full batches, then a short last one
    unless drop_last (what Ray's iter_torch_batches does)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def iter_torch_batches(self, batch_size, drop_last=False, prefetch_batches=1, device=None):
        for i in range(0, len(self.rows), batch_size):
            b = self.rows[i:i + batch_size]
            if len(b) == batch_size or not drop_last:
                yield {"tokens": b}

    def iter_batches(self, **kw):  # a stream's documents: packed by the stubbed packed_blocks
        return iter(())


@pytest.mark.parametrize("mode", ["prepare", "stream"])
def test_ray_workers_kept_pass_trains_every_block_across_epochs(tmp_path, monkeypatch, mode):
    """train_worker's own data path (rows_from, read_pass, epoch_stream), without Ray: a
    prepared set and a stream kept after their first pass both permute all their blocks."""
    import ray.train
    import ray.train.torch

    import raylm.train_ray as TR
    from raylm.config import to_dict

    rows = {"train": np.repeat(np.arange(N, dtype=np.int32)[:, None], 17, axis=1)}
    rows["val"] = rows["train"][:8]
    shards = {s: _Shard(torch.from_numpy(r)) for s, r in rows.items()}
    got = []
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda split: shards[split])
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)
    monkeypatch.setattr(TR, "_quiet_ray_train_logs", lambda: None)  # global logging state: not this test's
    monkeypatch.setattr(TR, "fit", lambda cfg, model, opt, objective, batches, *a, **k: got.append(batches))
    monkeypatch.setattr(TR, "packed_blocks", lambda docs, data, eos, seed, splits: ((s, r, None) for s in splits
                                                                                    for r in rows[s]))
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=ray-epochs", "model.vocab_size=64", "model.dim=32",
                                 "model.n_layers=1", "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16",
                                 "train.micro_batch_size=4", f"train.global_batch_size={G}", "train.eval_batches=1", "train.cpus_per_worker=1"])
    manifest = {"mode": mode, "columns": ["tokens"], "train": {"blocks": N}, "seq_len": 16, "eos_id": 1, "seed": 0}
    threads = torch.get_num_threads()
    try:
        TR.train_worker({"cfg": to_dict(cfg), "manifest": manifest, "resume": "never"})
    finally:
        torch.set_num_threads(threads)
    it, seen = iter(got[0]), set()
    assert [r for mb in next(it) + next(it) for r in _ids(mb)] == list(range(32))  # the first epoch is unchanged
    for _ in range(5 * (N // G)):
        step = next(it)
        assert sum(len(mb["tokens"]) for mb in step) == G
        seen.update(r for mb in step for r in _ids(mb))
    assert seen == set(range(N))
