"""Two gloo ranks, the model sharded by FSDP2 over them: every rank takes the same branch.

- An empty step (no target in the global batch) is decided on the all-reduced count: a rank
  whose own share is all masked still steps with the other, and when both are empty both
  skip. A rank that skipped alone would leave the other in FSDP's collectives.
- train.timeout_s is decided on rank 0's clock: ranks enter the loop at different moments,
  and one that timed out alone left the others waiting in the next step's collectives."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from raylm.config import ModelConfig
from tests.unit.gloo_ranks import gloo_group, run_ranks

CPU = torch.device("cpu")
VOCAB = 64
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_multiple_of=16)
LATE_S = 2.0  # how much later than rank 1 rank 0 enters the loop
TIMEOUT_S = 1.0  # under LATE_S: rank 1's own clock passes it while waiting for rank 0's first step


def _sft_batch(rank: int, masked: bool) -> dict:
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(rank))
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[:, 9:] = not masked
    return {"tokens": tokens, "loss_mask": mask}


def _empty_steps(rank: int) -> list:
    from raylm.objectives import SFTObjective
    from raylm.parallel import build_parallel_model, is_sharded
    from raylm.train import make_optimizer, train_step
    from raylm.config import TrainConfig

    model = build_parallel_model(CFG, CPU, "fp32", seed=0)
    assert is_sharded(model)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1), CPU)
    out = []
    # rank 0's share all masked, rank 1's not; then both all masked
    for masks in ((True, False), (True, True)):
        before = [p.full_tensor().clone() for p in model.parameters()]
        stats = train_step(model, opt, [_sft_batch(rank, masks[rank])], SFTObjective(), 1e-3, 1.0)
        moved = any(not torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
        out.append((stats.empty, stats.count, moved))
    return out


def _timeout(rank: int, root: str) -> str:
    import importlib
    import time

    from raylm.batches import RankBatches, rank_val_batches, reshuffled
    from raylm.config import load_config
    from raylm.objectives import NextTokenObjective
    from raylm.train import Hooks, checkpoint_facts, fit, setup_model, storage_publisher

    cfg = load_config(overrides=[
        f"storage={root}", "name=timed", "model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
        "model.max_seq_len=16", "data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.warmup_steps=1", "train.max_steps=1000000", "train.log_every=1000000", "train.eval_every=1000000",
        "train.ckpt_every=1000000", "train.eval_batches=1", "train.async_checkpoint=false",
        f"train.timeout_s={TIMEOUT_S}"]).for_device("cpu")
    model, opt, start = setup_model(cfg, CPU, "never", log=lambda *_: None)
    rows = {"tokens": torch.as_tensor(np.random.default_rng(0).integers(0, VOCAB, (16, 17)))}
    passes = [{k: v[i:i + 4] for k, v in rows.items()} for i in range(0, 16, 4)]
    batches = RankBatches(lambda epoch: reshuffled(passes, cfg.seed, epoch), 4, 2, rank, 2, 16, 0, CPU)
    hooks = Hooks(report=lambda m: None, publish_checkpoint=storage_publisher(cfg),
                  val_batches=lambda: rank_val_batches(rows, cfg.train, rank, 2, CPU),
                  checkpoint_meta=checkpoint_facts(cfg, None))
    # fit imports it after its clock starts: imported here, rank 0's first step stays well
    # under TIMEOUT_S even on a busy machine, so its own clock would not have timed out yet
    importlib.import_module("raylm.eval.in_training")
    if rank == 0:
        time.sleep(LATE_S)  # rank 0 comes to the loop later, as after reading metrics.jsonl
    try:
        fit(cfg, model, opt, NextTokenObjective(), batches, hooks, start, "cpu", log=lambda *_: None)
    except Exception as e:  # noqa: BLE001 - the test compares what each rank ended with
        return f"{type(e).__name__}: {e}"
    return "finished"


def _rank_main(rank: int, store_path: str, root: str, out_path: str) -> None:
    with gloo_group(rank, 2, store_path, timeout_s=30):
        out = {"empty": _empty_steps(rank)}
        out["timeout"] = _timeout(rank, root)
        torch.save(out, f"{out_path}.{rank}")


@pytest.mark.timeout(300)
def test_two_ranks_take_the_same_branch_for_empty_steps_and_the_timeout(tmp_path):
    out = str(tmp_path / "out")
    run_ranks(_rank_main, lambda r: (r, str(tmp_path / "store"), str(tmp_path), out))
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    # the global count (16 assistant tokens of rank 1) decides: both step, then both skip
    assert got[0]["empty"] == got[1]["empty"] == [(False, 16, True), (True, 0, False)]
    ends = [g["timeout"] for g in got]
    assert ends[0] == ends[1], ends  # the same error, naming the same step
    assert ends[0].startswith("TrainingTimeout: step ") and f"train.timeout_s={TIMEOUT_S}" in ends[0]
