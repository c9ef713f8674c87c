"""Post-training takes its parent's model (raylm.posttrain.parent_of): a model.* setting that
differs from the parent's is refused by name rather than dropped, a setting equal to it is
fine, and data.seq_len is checked against the parent's context, not the default model's."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError, load_config
from raylm.posttrain import parent_of


def sft_config(tiny_run, *overrides):
    return load_config(overrides=["stage=sft", f"init_from={tiny_run}", *overrides])


def test_a_model_setting_that_differs_from_the_parent_is_named(tiny_run):
    with pytest.raises(ConfigError, match=r"^model\.dim=32: sft keeps the parent's model shape \(model\.dim=64 in "):
        parent_of(sft_config(tiny_run, "model.dim=32"))
    cfg, _ = parent_of(sft_config(tiny_run, "model.dim=64", "model.n_layers=2"))  # the parent's own: fine
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads) == (64, 2, 2)


def test_data_seq_len_is_checked_against_the_parents_context(tiny_run):
    cfg = sft_config(tiny_run, "data.seq_len=500")  # over the default model's 256: not this run's model
    with pytest.raises(ConfigError, match=r"data\.seq_len=500 exceeds the parent's model\.max_seq_len=128"):
        parent_of(cfg)
    cfg, _ = parent_of(sft_config(tiny_run, "data.seq_len=100"))
    assert cfg.data.seq_len == 100 and cfg.model.max_seq_len == 128
