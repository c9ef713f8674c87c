"""Which validation rows a run evaluates on: the first train.eval_batches global batches,
each counted once over the ranks, so val_loss is the same for any worker count and
micro-batch size (a resume on other workers, runs or Tune trials that differ only in them).
Ranks are simulated in one process (each rank's sums added up, as the all-reduce does) and,
once, run for real: two gloo ranks with the model sharded by FSDP2, where a rank whose share
is short still makes every forward pass the other waits for."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from raylm.batches import rank_val_batches
from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.objectives import DPOObjective, NextTokenObjective, SFTObjective, reference_logprobs
from raylm.train import evaluate, evaluate_metrics
from tests.unit.gloo_ranks import gloo_group, run_ranks

CPU = torch.device("cpu")
VOCAB, T = 64, 9
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  ffn_multiple_of=16)
TC = TrainConfig(micro_batch_size=4, global_batch_size=16, eval_batches=2)
N_ROWS = 45  # more than eval_batches * global_batch_size = 32: the set is the first 32 rows


def _ids(n: int) -> dict:
    """n rows whose first token is the row's index: a row's identity."""
    return {"tokens": torch.arange(n, dtype=torch.int32)[:, None].expand(n, T).contiguous()}


def _real_rows(batches) -> list[list[int]]:
    """Per micro-batch, the row ids it counts ([] for one that counts nothing). A padding
    micro-batch is one `evaluate` counts no units of: measured, not looked up."""
    out = []
    for mb in batches:
        _, n = evaluate(_Ones(), _RowCount(), [mb])
        out.append(mb["tokens"][:, 0].tolist() if n else [])
    return out


class _Ones(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))


class _RowCount:
    """Counts rows; its loss is the sum of the rows' ids, so a sum tells which rows counted."""

    def count(self, batch):
        return int(batch["tokens"].shape[0])

    def loss_sum(self, model, batch):
        return batch["tokens"][:, 0].double().sum() * model.w


@pytest.mark.parametrize("n_rows,world,micro,global_batch,eval_batches", [
    (45, 1, 4, 16, 2), (45, 2, 4, 16, 2), (45, 2, 16, 16, 2), (45, 4, 2, 16, 2), (45, 3, 1, 15, 2),
    (10, 3, 4, 12, 8), (7, 7, 2, 14, 5), (33, 4, 16, 64, 8), (50, 1, 8, 8, 100), (3, 4, 1, 4, 1),
    (1, 2, 8, 8, 1), (17, 2, 1, 2, 100), (100, 8, 3, 24, 1),
])
def test_each_row_of_the_set_counts_once_and_every_rank_runs_as_many_passes(n_rows, world, micro,
                                                                            global_batch, eval_batches):
    tc = replace(TC, micro_batch_size=micro, global_batch_size=global_batch, eval_batches=eval_batches)
    per_rank = [rank_val_batches(_ids(n_rows), tc, r, world, CPU) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) >= 1  # FSDP: same forward count
    assert all(0 < mb["tokens"].shape[0] <= micro for b in per_rank for mb in b)
    rows = [r for b in per_rank for mb_rows in _real_rows(b) for r in mb_rows]
    # The first eval_batches global batches of rows (or all of them), each once.
    assert sorted(rows) == list(range(min(n_rows, eval_batches * global_batch)))
    # The fewest passes that keep a micro-batch within micro_batch_size rows.
    assert len(per_rank[0]) == math.ceil(math.ceil(min(n_rows, eval_batches * global_batch) / world) / micro)


def test_the_set_does_not_depend_on_workers_or_micro_batch():
    sets = set()
    for world in (1, 2, 4):
        for micro in (1, 4, 16):
            per_rank = [rank_val_batches(_ids(N_ROWS), replace(TC, micro_batch_size=micro), r, world, CPU)
                        for r in range(world)]
            sets.add(tuple(sorted(r for b in per_rank for rows in _real_rows(b) for r in rows)))
    assert sets == {tuple(range(32))}


def test_an_empty_validation_split_is_named():
    with pytest.raises(ValueError, match="data.val_fraction"):
        rank_val_batches({"tokens": torch.zeros(0, T, dtype=torch.int32)}, TC, 0, 2, CPU)
    # Fewer rows than workers is no error: a rank without a row runs a padding pass.
    assert len(rank_val_batches(_ids(1), TC, 1, 2, CPU)) == 1


# --------------------------------------------------------------------------- every objective


def _stage_rows(stage: str, n: int = N_ROWS) -> dict:
    """n validation rows of a stage's columns; masks vary per row, so the loss units a row
    carries differ and a row counted twice (or not at all) moves the weighted mean."""
    g = torch.Generator().manual_seed(7)
    tokens = lambda: torch.randint(0, VOCAB, (n, T), generator=g)  # noqa: E731
    # Position 1 is always a target: every row (every response) carries a loss unit.
    mask = lambda: (torch.rand(n, T, generator=g) < torch.linspace(0.2, 0.9, n)[:, None]).index_fill(  # noqa: E731
        1, torch.tensor([1]), True)
    if stage == "pretrain":
        return {"tokens": tokens()}
    if stage == "sft":
        return {"tokens": tokens(), "loss_mask": mask()}
    rows = {"chosen": tokens(), "chosen_mask": mask(), "rejected": tokens(), "rejected_mask": mask()}
    return rows


def _objective(stage: str, reference=None):
    if stage == "pretrain":
        return NextTokenObjective()
    if stage == "sft":
        return SFTObjective()
    return DPOObjective(beta=0.5, reference=reference)


def _simulated(model, objective, rows, tc, world: int) -> tuple[float, int, dict]:
    """(val_loss, units, metrics) of `world` ranks computed one after another in this
    process: each rank's loss and metric sums added up, as evaluate's all-reduce adds them."""
    loss, units, metrics = 0.0, 0, {}
    for r in range(world):
        batches = rank_val_batches(rows, tc, r, world, CPU)
        mean, n = evaluate(model, objective, batches)
        loss, units = loss + mean * n, units + n
        if hasattr(objective, "metrics"):
            for k, v in evaluate_metrics(model, objective, batches).items():
                metrics[k] = metrics.get(k, 0.0) + v * n  # a rank's metrics are its unit-weighted means
    return loss / units, units, {k: v / units for k, v in metrics.items()}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_val_loss_is_the_same_for_any_workers_and_micro_batch(stage):
    model = build_model(CFG, seed=0).eval()
    reference = build_model(CFG, seed=1).eval() if stage == "dpo" else None
    objective, rows = _objective(stage, reference), _stage_rows(stage)
    results = {(world, micro): _simulated(model, objective, rows, replace(TC, micro_batch_size=micro), world)
               for world in (1, 2, 3) for micro in (1, 4, 16)}
    # The reference: the set's 32 rows in one batch, in one process.
    whole = {k: v[:32] for k, v in rows.items()}
    want_loss, want_units = evaluate(model, objective, [whole])
    for key, (loss, units, metrics) in results.items():
        assert units == want_units, key
        assert loss == pytest.approx(want_loss, rel=1e-5), key
        if stage == "dpo":
            assert metrics == pytest.approx(evaluate_metrics(model, objective, [whole]), rel=1e-5, abs=1e-6), key


def test_dpo_with_precomputed_reference_columns():
    model, reference = build_model(CFG, seed=0).eval(), build_model(CFG, seed=1).eval()
    rows = _stage_rows("dpo")
    rows.update(reference_logprobs(reference, rows))
    objective = DPOObjective(beta=0.5)
    want = evaluate(model, objective, [{k: v[:32] for k, v in rows.items()}])
    for world, micro in ((1, 4), (2, 16), (3, 1)):
        loss, units, _ = _simulated(model, objective, rows, replace(TC, micro_batch_size=micro), world)
        assert units == want[1] and loss == pytest.approx(want[0], rel=1e-5)


# --------------------------------------------------------------------------- two real ranks


CASES = ((45, 4), (45, 1), (1, 16))  # (validation rows, micro-batch size)


def _rank_main(rank: int, world: int, store_path: str, out_path: str) -> None:
    from raylm.parallel import build_parallel_model, is_sharded

    with gloo_group(rank, world, store_path):
        out = {}
        model = build_parallel_model(CFG, CPU, "fp32", seed=0).eval()
        reference = build_parallel_model(CFG, CPU, "fp32", seed=1).eval()
        assert is_sharded(model) and is_sharded(reference)  # forward passes gather: collectives
        for n_rows, micro in CASES:
            for stage in ("pretrain", "sft", "dpo"):
                objective = _objective(stage, reference if stage == "dpo" else None)
                batches = rank_val_batches(_stage_rows(stage, n_rows), replace(TC, micro_batch_size=micro),
                                           rank, world, CPU)
                out[n_rows, micro, stage] = (*evaluate(model, objective, batches),
                                             evaluate_metrics(model, objective, batches) if stage == "dpo" else {})
        torch.save(out, f"{out_path}.{rank}")


@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_process(tmp_path):
    """Two processes, the model and DPO's reference sharded by FSDP2 over them: the loss, its
    units and DPO's metrics equal one process's on the same rows. 45 rows in micro-batches
    of 1 is an uneven split (one rank runs a padding pass); 1 row leaves rank 1 only a
    padding pass. A rank that skipped a forward pass would hang the other until the group's
    timeout, and fail."""
    out = str(tmp_path / "out")
    run_ranks(_rank_main, lambda r: (r, 2, str(tmp_path / "store"), out))
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    assert got[0] == got[1]  # every rank has the reduced figures
    model, reference = build_model(CFG, seed=0).eval(), build_model(CFG, seed=1).eval()
    for n_rows, micro in CASES:
        for stage in ("pretrain", "sft", "dpo"):
            objective = _objective(stage, reference if stage == "dpo" else None)
            whole = {k: v[:min(n_rows, 32)] for k, v in _stage_rows(stage, n_rows).items()}
            want_loss, want_units = evaluate(model, objective, [whole])
            loss, units, metrics = got[0][n_rows, micro, stage]
            assert units == want_units and loss == pytest.approx(want_loss, rel=1e-5), (n_rows, micro, stage)
            if stage == "dpo":
                assert metrics == pytest.approx(evaluate_metrics(model, objective, [whole]), rel=1e-5, abs=1e-6)
