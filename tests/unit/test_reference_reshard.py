"""DPO's frozen reference never runs backward, so no FSDP unit of it may stay gathered after
its forward: a trained model keeps the root (embeddings, head) and the last block unsharded
for the backward that follows, but for the reference nothing ever reshards them, and their
compute copies would be held for the whole run (raylm.parallel.shard_model's `frozen`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from raylm.config import ModelConfig, load_config
from raylm.objectives import DPOObjective, reference_logprobs
from raylm.parallel import build_parallel_model, init_local_process_group

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _group(one_thread):
    """A one-process gloo group: the sharded (FSDP2) path, as a Ray Train worker runs it."""
    init_local_process_group(CPU)
    yield
    dist.destroy_process_group()


def _batch(B=3, T=10):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CFG.vocab_size, (B, 4), generator=g)
    chosen = torch.cat([prompt, torch.randint(0, CFG.vocab_size, (B, T - 4), generator=g)], 1)
    rejected = torch.cat([prompt, torch.randint(0, CFG.vocab_size, (B, T - 4), generator=g)], 1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 4:] = True
    return {"chosen": chosen, "chosen_mask": mask, "rejected": rejected, "rejected_mask": mask.clone()}


def gathered_units(model) -> list[str]:
    """The FSDP units of `model` whose parameters are gathered (unsharded) now. FSDP2
    registers the sharded parameters, DTensors, on a resharded unit and plain tensors on a
    gathered one (fully_shard's documentation of reshard_after_forward); FSDP's own state,
    where this torch has it, must agree."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        # A unit's parameters: those under it that no nested unit manages.
        nested = {id(p) for n, m in module.named_modules() if n and isinstance(m, FSDPModule) for p in m.parameters()}
        own = [p for p in module.parameters() if id(p) not in nested]
        plain = any(not isinstance(p, DTensor) for p in own)
        states = []
        try:  # private, so only a cross-check: FSDPParam.sharded_state
            states = [fp.sharded_state.name for g in module._get_fsdp_state()._fsdp_param_groups
                      for fp in g.fsdp_params]
        except AttributeError:
            pass
        assert plain == ("UNSHARDED" in states) or not states, (name, plain, states)
        if plain or "UNSHARDED" in states:
            out.append(name or "<root>")
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_frozen_model_reshards_every_unit_after_forward(precision):
    ref = build_parallel_model(CFG, CPU, precision, seed=0, frozen=True).requires_grad_(False).eval()
    assert gathered_units(ref) == []
    reference_logprobs(ref, _batch())
    assert gathered_units(ref) == []
    # The trained model's settings keep the root and the last block gathered after a forward,
    # for the backward that follows (which reshards them): what the reference used to get.
    policy = build_parallel_model(CFG, CPU, precision, seed=0)
    with torch.no_grad():
        policy(_batch()["chosen"])
    assert gathered_units(policy) == ["<root>", "layers.1"]


def test_dpo_reference_is_fully_resharded_after_each_step_and_the_loss_is_unchanged(tmp_path, monkeypatch):
    """raylm.train.reference_model (what train_local and the Ray workers build) under bf16:
    after the reference forwards of a DPO loss, none of its units is left gathered, and the
    loss is the one a reference kept gathered gives."""
    import raylm.train as train

    monkeypatch.setattr(train, "load_parent_weights", lambda model, cfg: cfg.init_from)  # seed-0 weights
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=dpo", "stage=dpo", f"init_from={tmp_path}/sft",
                                 "model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
                                 "model.n_kv_heads=2", "model.max_seq_len=16", "data.seq_len=16",
                                 "train.precision=bf16", "train.compile=false", "seed=0"])
    ref = train.reference_model(cfg, CPU)
    kept = build_parallel_model(cfg.model, CPU, "bf16", seed=0).requires_grad_(False).eval()  # the old settings
    policy = build_parallel_model(cfg.model, CPU, "bf16", seed=1)
    batch = _batch()
    losses = []
    for reference in (ref, kept):
        obj = DPOObjective(beta=0.1, reference=reference)
        value = obj.loss_sum(policy, batch)
        value.backward()
        losses.append(value.detach())
        policy.zero_grad(set_to_none=True)
    assert gathered_units(ref) == []
    assert gathered_units(kept) == ["<root>", "layers.1"]
    assert losses[0].item() == losses[1].item() and torch.isfinite(losses[0])
    assert abs(losses[0].item() - 3 * math.log(2)) > 1e-3  # policy != reference: a real Δ
    # A second step's reference forward gathers again and reshards again.
    DPOObjective(beta=0.1, reference=ref).loss_sum(policy, batch).backward()
    assert gathered_units(ref) == []
