"""Width scaling (model.width_scaling): muP and the sqrt learning-rate rule.

The learning-rate sweep across widths is benchmarks/mup_transfer.py (minutes); here, the
mechanics, the identity at the base width, and muP's coordinate check: after a few Adam
steps at one learning rate, how far the logits move grows with width under the standard
parametrisation and stays put under muP, which is why muP's best learning rate transfers.
"""

from __future__ import annotations

import pytest
import torch

from raylm.config import ConfigError, ModelConfig, TrainConfig, load_config
from raylm.model import build_model
from raylm.objectives import NextTokenObjective
from raylm.train import make_optimizer, train_step

TC = TrainConfig(lr=1e-2, weight_decay=0.0, num_workers=1)


def _cfg(width: int, scaling: str = "none", base: int = 64) -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=width, n_layers=2, n_heads=width // 16, max_seq_len=32,
                       width_scaling=scaling, base_dim=base)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(seed))


def test_mup_at_base_width_is_the_standard_model(one_thread):
    """m = 1: the same weights, logits and optimizer steps as width_scaling=none."""
    tokens = _tokens()
    models = [build_model(_cfg(64, s), seed=0) for s in ("none", "mup", "sqrt")]
    opts = [make_optimizer(m, TC, torch.device("cpu")) for m in models]
    for _ in range(2):
        for m, o in zip(models, opts):
            train_step(m, o, [{"tokens": tokens}], NextTokenObjective(), 1e-2, 1.0)
    ref = models[0].state_dict()
    for m in models[1:]:
        for k, v in m.state_dict().items():
            assert torch.equal(v, ref[k]), k
    # Off, the optimizer is what it always was: two groups, no per-group scale.
    assert [set(g) & {"lr_scale"} for g in opts[0].param_groups] == [set(), set()]


def test_mup_init_and_learning_rates_follow_the_width(one_thread):
    m = build_model(_cfg(256, "mup"), seed=0)  # width multiplier 4
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(m.tok_embeddings.weight) == pytest.approx(0.02, rel=0.05)  # embeddings as at base width
    assert std(m.layers[0].attention.wq.weight) == pytest.approx(0.02 / 2, rel=0.05)  # 1/sqrt(m)
    assert std(m.layers[0].feed_forward.w2.weight) == pytest.approx(0.02 / 2 / 2, rel=0.05)  # and 1/sqrt(2L)
    opt = make_optimizer(m, TC, torch.device("cpu"))
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale[id(m.layers[0].attention.wq.weight)] == 0.25
    assert scale[id(m.tok_embeddings.weight)] == 1.0 and scale[id(m.norm.weight)] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    train_step(m, opt, [{"tokens": _tokens()}], NextTokenObjective(), 1e-2, 1.0)
    lrs = {g["lr_scale"]: g["lr"] for g in opt.param_groups}
    assert lrs == {0.25: pytest.approx(2.5e-3), 1.0: pytest.approx(1e-2)}
    # The logits are divided by m, on the plain head and on the chunked loss's alike.
    plain = build_model(_cfg(256, "none"), seed=0)
    with torch.no_grad():
        plain.load_state_dict(m.state_dict())
        x = _tokens()[:, :-1]
        torch.testing.assert_close(m(x)[0], plain(x)[0] / 4)


def test_sqrt_rule_scales_every_rate():
    m = build_model(_cfg(256, "sqrt"), seed=0)
    opt = make_optimizer(m, TC, torch.device("cpu"))
    assert {g["lr_scale"] for g in opt.param_groups} == {0.5}  # (256 / 64) ** -0.5


def _logit_shift(width: int, scaling: str) -> float:
    """Mean |change of logits| after 3 Adam steps at lr 1e-2 on a fixed batch."""
    tokens = _tokens()
    m = build_model(_cfg(width, scaling), seed=0)
    opt = make_optimizer(m, TC, torch.device("cpu"))
    with torch.no_grad():
        before = m(tokens[:, :-1])[0]
    for _ in range(3):
        train_step(m, opt, [{"tokens": tokens}], NextTokenObjective(), 1e-2, 1.0)
    with torch.no_grad():
        return (m(tokens[:, :-1])[0] - before).abs().mean().item()


def test_coordinate_check_updates_stay_width_independent_under_mup(one_thread):
    """Measured here: the standard model's shift grows 3.5x from width 64 to 256; muP's 0.66x."""
    sp = _logit_shift(256, "none") / _logit_shift(64, "none")
    mup = _logit_shift(256, "mup") / _logit_shift(64, "mup")
    assert sp > 2.0, sp
    assert 0.4 < mup < 1.5, mup


def test_width_scaling_is_checked():
    with pytest.raises(ConfigError, match="model.width_scaling='mu'"):
        load_config(overrides=["model.width_scaling=mu"])
    with pytest.raises(ConfigError, match="model.base_dim=-1"):
        load_config(overrides=["model.base_dim=-1"])
    assert load_config(overrides=["model.dim=256", "model.base_dim=64"]).model.width_multiplier == 4.0
