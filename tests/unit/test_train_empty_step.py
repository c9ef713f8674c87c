"""A step whose global batch has no target to learn from (every SFT label masked, every DPO
pair's responses masked out) takes no optimizer step: AdamW would still move the weights
through its momentum and weight decay. The loop counts and logs such steps."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.distributed as dist

from raylm.config import ModelConfig, TrainConfig, load_config
from raylm.model import build_model
from raylm.objectives import DPOObjective, SFTObjective
from raylm.train import make_optimizer, train_local, train_step

CPU = torch.device("cpu")
VOCAB = 64
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_multiple_of=16)
TC = TrainConfig(lr=1e-3, weight_decay=0.1, micro_batch_size=4, global_batch_size=4)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(seed))


def _mask(on: bool) -> torch.Tensor:
    mask = torch.zeros(4, 17, dtype=torch.bool)
    mask[:, 9:] = on
    return mask


def _state(model, opt) -> dict:
    params = {f"param.{k}": v.detach().clone() for k, v in model.named_parameters()}
    opt_state = {f"opt.{i}.{k}": v.clone() for i, st in copy.deepcopy(opt.state_dict())["state"].items()
                 for k, v in st.items()}
    return {**params, **opt_state}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _check(objective, batch_with, batch_without) -> None:
    assert not dist.is_initialized()
    model = build_model(CFG, seed=0)
    opt = make_optimizer(model, TC, CPU)
    first = train_step(model, opt, [batch_with], objective, 1e-3, 1.0)  # AdamW's moments exist now
    assert first.grad_norm > 0
    before = _state(model, opt)
    stats = train_step(model, opt, [batch_without], objective, 1e-3, 1.0)
    _assert_same(_state(model, opt), before)  # weights, moments and AdamW's step count
    assert all(p.grad is None for p in model.parameters())
    assert stats.empty and not stats.skipped
    train_step(model, opt, [batch_with], objective, 1e-3, 1.0)  # a normal step still updates
    assert not torch.equal(model.tok_embeddings.weight, before["param.tok_embeddings.weight"])


def test_sft_step_with_every_label_masked_leaves_weights_and_adamw_state_unchanged():
    tokens = _tokens(1)
    _check(SFTObjective(), {"tokens": tokens, "loss_mask": _mask(True)},
           {"tokens": tokens, "loss_mask": _mask(False)})


def test_dpo_step_with_every_response_masked_leaves_weights_and_adamw_state_unchanged():
    objective = DPOObjective(beta=0.5, reference=build_model(CFG, seed=1).eval())
    pair = {"chosen": _tokens(2), "rejected": _tokens(3)}
    masked_out = {**pair, "chosen_mask": _mask(False), "rejected_mask": _mask(False)}
    _check(objective, {**pair, "chosen_mask": _mask(True), "rejected_mask": _mask(True)}, masked_out)
    assert objective.count(masked_out) == 4 and objective.trainable(masked_out) == 0
    one_side = {**masked_out, "rejected_mask": _mask(True)}  # a pair with one response left still trains
    assert objective.trainable(one_side) == 4


def test_the_loop_skips_counts_and_logs_an_empty_sft_step(tmp_path):
    """train_local over three global batches, the second with every label masked: the step is
    counted in `empty_steps` of every later metrics row and said in the log, and is neither a
    non-finite step nor a loss the spike guard keeps; its row and log line show no loss."""
    rows = np.asarray(_tokens(4).repeat(6, 1), dtype=np.int32)  # 24 rows of 17 tokens
    mask = np.zeros_like(rows, dtype=bool)
    mask[:, 9:] = True
    mask[8:16] = False  # the second global batch of 8
    val = {"tokens": rows[:4], "loss_mask": mask[:4]}
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=sft", "stage=sft", "model.vocab_size=64", "model.dim=32",
                                 "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16",
                                 "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=1",
                                 "train.max_steps=3", "train.log_every=1", "train.eval_every=100",
                                 "train.ckpt_every=100", "train.eval_batches=1", "train.async_checkpoint=false"])
    said: list[str] = []
    train_local(cfg, {"tokens": rows, "loss_mask": mask}, val, log=said.append,
                manifest={"eos_id": 1, "pad_id": 0, "columns": ["tokens", "loss_mask"]})
    train = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert [(r["step"], r["empty_steps"], r["skipped_steps"], r["assistant_tokens"]) for r in train] == \
        [(1, 0, 0, 64), (2, 1, 0, 0), (3, 1, 0, 64)]
    assert [s for s in said if "masked" in s] == [
        "step 2: every target of the global batch is masked, nothing to learn; optimizer step skipped"]
    # No loss was computed: null in its row and "-" in its log line, not a perfect 0.0 on the curve.
    assert (train[1]["loss"], train[1]["grad_norm"]) == (None, None)
    assert any(s.startswith("step 2/3 | loss - |") and "| grad - |" in s for s in said), said
