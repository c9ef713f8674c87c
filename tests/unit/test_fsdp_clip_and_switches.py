"""Two gloo ranks sharding the model with FSDP2 (and HSDP) follow one unsharded process step
for step with the switches that change how a step is computed: gradient clipping that
binds (the norm it clips by is the global one over every shard, not a rank's own: SGD, whose
update scales with the gradient, shows a per-rank clip coefficient at once), accumulation
over micro-batches, activation checkpointing, a tied or untied head, QK-norm, document
masking and the chunked loss. Each rank's shards of a freshly built model are the slices of
the model one process builds from the same seed, whatever the switches (init does not
depend on the rank or the wrapping)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raylm.config import ModelConfig
from raylm.model import build_model
from raylm.objectives import NextTokenObjective
from raylm.train import train_step
from tests.unit.gloo_ranks import gloo_group, run_ranks

CPU = torch.device("cpu")
BASE = ModelConfig(vocab_size=64, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=32)
STEPS, ROWS, MICRO, SEP, CLIP = 3, 8, 2, 0, 0.05
CASES = {  # name: (model fields, build_parallel_model switches, objective fields)
    "untied-checkpointed-doc-mask": ({"tie_embeddings": False}, {"activation_checkpointing": True}, {"doc_sep": SEP}),
    "tied-qk-norm-chunked": ({"qk_norm": True}, {}, {"chunk_size": 5}),
    "hsdp-tied-doc-mask": ({}, {"replicate_degree": 2}, {"doc_sep": SEP}),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        t = torch.randint(1, BASE.vocab_size, (ROWS, 17), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.15] = SEP  # documents of uneven lengths
        out.append(t)
    return out


def _run(model, rank: int, world: int, objective) -> list[tuple[float, float]]:
    """STEPS steps of SGD on this rank's rows, MICRO rows per micro-batch, clipped at CLIP."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    per, stats = ROWS // world, []
    for b in _batches():
        mine = b[rank * per:(rank + 1) * per]
        s = train_step(model, opt, [{"tokens": mine[i:i + MICRO]} for i in range(0, per, MICRO)], objective, 1.0, CLIP)
        stats.append((s.loss, s.grad_norm))
    return stats


def _plain(state: dict) -> dict[str, torch.Tensor]:
    """A state dict under the plain model's names (activation checkpointing wraps the blocks)."""
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}


def _rank_main(rank: int, world: int, store_path: str, out_path: str) -> None:
    from raylm.parallel import build_parallel_model, is_sharded

    with gloo_group(rank, world, store_path):
        out = {}
        for name, (fields, switches, objective) in CASES.items():
            cfg = replace(BASE, **fields)
            model = build_parallel_model(cfg, CPU, "fp32", seed=1, **switches)
            assert is_sharded(model)
            init = _plain({k: v.full_tensor() for k, v in model.state_dict().items()})
            # every rank's shards, gathered, are the one-process model of the seed
            for k, v in build_model(cfg, seed=1).state_dict().items():
                assert torch.equal(init[k], v), (name, rank, k)
            stats = _run(model, rank, world, NextTokenObjective(**objective))
            out[name] = (stats, _plain({k: v.full_tensor() for k, v in model.state_dict().items()}))
        if rank == 0:
            torch.save(out, out_path)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    out = str(tmp / "out")
    run_ranks(_rank_main, lambda r: (r, 2, str(tmp / "store"), out))
    return torch.load(out)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CASES)
def test_two_sharded_ranks_follow_one_process_with_clipping_that_binds(two_ranks, name):
    fields, _, objective = CASES[name]
    model = build_model(replace(BASE, **fields), seed=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    want = _run(model, 0, 1, NextTokenObjective(**objective))
    assert all(norm > 5 * CLIP for _, norm in want)  # the clip binds at every step
    stats, weights = two_ranks[name]
    torch.testing.assert_close(torch.tensor(stats), torch.tensor(want), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert not torch.allclose(v, init[k]) or k.endswith("norm.weight"), k  # the steps moved it
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")
