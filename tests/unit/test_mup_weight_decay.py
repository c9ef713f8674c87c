"""muP's weight decay: AdamW shrinks a weight by lr * weight_decay a step (decoupled decay),
so where muP divides a hidden matrix's learning rate by the width multiplier m, its weight
decay must be multiplied by m (as mup's MuAdamW does) for a decay tuned on the proxy to
mean the same at the target width. Before, the hidden matrices kept the proxy's
weight_decay, and their per-step decay fell to lr * wd / m.
"""

from __future__ import annotations

import pytest
import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.model import build_model
from raylm.train import make_optimizer, train_step

TC = TrainConfig(lr=1e-2, weight_decay=0.1, num_workers=1)
IO = {"tok_embeddings.weight", "output.weight"}


def _cfg(width: int, scaling: str = "mup", base: int = 64) -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=width, n_layers=2, n_heads=width // 16, max_seq_len=32,
                       width_scaling=scaling, base_dim=base)


def _decay_per_step(model, opt, lr: float) -> dict[str, float]:
    """name -> lr * weight_decay of its group, at peak rate `lr` (train_step's lr_scale rule)."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {n: lr * group_of[id(p)].get("lr_scale", 1.0) * group_of[id(p)]["weight_decay"]
            for n, p in model.named_parameters()}


def test_mup_keeps_each_matrix_decay_per_step_across_widths():
    base, wide = build_model(_cfg(64), seed=0), build_model(_cfg(256), seed=0)  # m = 1 and m = 4
    d_base = _decay_per_step(base, make_optimizer(base, TC, torch.device("cpu")), TC.lr)
    opt = make_optimizer(wide, TC, torch.device("cpu"))
    d_wide = _decay_per_step(wide, opt, TC.lr)
    assert d_base.keys() == d_wide.keys()
    for name, p in wide.named_parameters():
        want = TC.lr * TC.weight_decay if p.ndim >= 2 else 0.0  # norms (and biases) never decay
        assert d_base[name] == pytest.approx(want), name
        assert d_wide[name] == pytest.approx(want), name
    # The hidden matrices carry the rule: lr / m and weight_decay * m; embeddings and head
    # keep the proxy's settings, norms no decay.
    wd = {n: g["weight_decay"] for n, p in wide.named_parameters() for g in opt.param_groups
          if any(q is p for q in g["params"])}
    assert wd["layers.0.attention.wq.weight"] == pytest.approx(0.4)
    assert wd["layers.1.feed_forward.w2.weight"] == pytest.approx(0.4)
    assert wd["tok_embeddings.weight"] == pytest.approx(0.1)
    assert wd["norm.weight"] == 0.0 and wd["layers.0.attention_norm.weight"] == 0.0


class _ZeroGradient:
    """An objective whose loss is 0 * (every parameter): gradients are zeros, so Adam's step
    is zero and a parameter changes by its weight decay alone."""

    def count(self, batch):
        return 1

    def tokens(self, batch):
        return 1

    def loss_sum(self, model, batch):
        return sum(p.sum() for p in model.parameters()) * 0.0


def _shrink_after_one_step(width: int, lr: float) -> dict[str, float]:
    model = build_model(_cfg(width), seed=0)
    opt = make_optimizer(model, TC, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = train_step(model, opt, [{"tokens": torch.zeros(1, 2, dtype=torch.long)}], _ZeroGradient(), lr, 1.0)
    assert not stats.skipped
    return {n: float((p.detach().norm() / before[n].norm())) for n, p in model.named_parameters()}


def test_one_step_shrinks_a_zero_gradient_hidden_matrix_equally_at_both_widths(one_thread):
    lr = 1e-2
    at_base, at_4x = _shrink_after_one_step(64, lr), _shrink_after_one_step(256, lr)
    hidden = [n for n in at_4x if n not in IO and not n.endswith("norm.weight")]
    assert hidden and "layers.0.attention.wq.weight" in hidden
    for name in hidden:
        assert at_base[name] == pytest.approx(1 - lr * TC.weight_decay, abs=1e-6), name
        assert at_4x[name] == pytest.approx(at_base[name], abs=1e-6), name
    assert at_4x["tok_embeddings.weight"] == pytest.approx(1 - lr * TC.weight_decay, abs=1e-6)
    assert at_4x["norm.weight"] == 1.0  # no decay on norms
