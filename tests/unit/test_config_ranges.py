"""Range checks: every numeric config key refuses values the code cannot use, at load time,
with one line naming the key and the value."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from raylm.config import (
    MIN_TOKENIZER_VOCAB,
    MODEL_PRESETS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    S3Config,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
    load_config,
)

SECTIONS = [Config, ModelConfig, TokenizerConfig, DataConfig, TrainConfig, SampleConfig, S3Config]


def refused(override: str) -> str:
    """The error for one override, checked to be one line naming its key and value."""
    key, raw = override.split("=", 1)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    named, _, rest = msg.partition(": ")
    shown_key, _, shown_value = named.partition("=")
    assert shown_key == key, msg
    assert str(float(shown_value)) == str(float(raw)), msg  # 0 may show as 0.0, nan as nan
    assert rest.startswith("expected ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("override", [
    "model.vocab_size=-1", "model.dim=0", "model.dim=-64", "model.n_layers=0", "model.n_heads=0",
    "model.n_kv_heads=0", "model.ffn_dim=0", "model.ffn_multiple_of=0", "model.max_seq_len=0",
    "model.rope_theta=1", "model.rope_theta=0", "model.rope_theta=inf", "model.norm_eps=0", "model.norm_eps=1",
    "model.norm_eps=nan", "model.init_std=0", "model.init_std=-0.02",
])
def test_model_ranges(override):
    refused(override)


@pytest.mark.parametrize("override", [
    "tokenizer.vocab_size=0", f"tokenizer.vocab_size={MIN_TOKENIZER_VOCAB - 1}", "tokenizer.sample_bytes=0",
    "tokenizer.character_coverage=0.5", "tokenizer.character_coverage=1.01", "tokenizer.character_coverage=nan",
])
def test_tokenizer_ranges(override):
    refused(override)


@pytest.mark.parametrize("override", [
    "data.seq_len=0", "data.val_fraction=-0.1", "data.val_fraction=1", "data.val_fraction=nan",
    "data.min_chars=-1", "data.max_chars=0", "data.shuffle_window=0", "data.blocks_per_shard=0",
    "data.tokenizer_actors=-1", "data.max_bad_records=-1", "data.near_dup_threshold=0",
    "data.near_dup_threshold=1", "data.minhash_perm=0",
])
def test_data_ranges(override):
    refused(override)


@pytest.mark.parametrize("override", [
    "train.num_workers=0", "train.cpus_per_worker=0", "train.micro_batch_size=0", "train.global_batch_size=0",
    "train.max_steps=0", "train.max_steps=-5", "train.lr=0", "train.lr=-1e-3", "train.lr=nan", "train.lr=inf",
    "train.min_lr_ratio=-0.1", "train.min_lr_ratio=1.5", "train.warmup_steps=-1", "train.weight_decay=-0.1",
    "train.beta1=1", "train.beta1=-0.1", "train.beta2=1", "train.grad_clip=-1", "train.grad_clip=nan",
    "train.log_every=0", "train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=0",
    "train.keep_checkpoints=0", "train.z_loss=-1e-4", "train.loss_chunk_size=-1", "train.max_nonfinite_steps=-1",
    "train.spike_factor=0.5", "train.spike_factor=1", "train.spike_factor=-1", "train.spike_window=0",
    "train.max_rollbacks=-1", "train.timeout_s=-1", "train.time_budget_s=-1", "train.time_budget_s=inf",
])
def test_train_ranges(override):
    refused(override)


@pytest.mark.parametrize("override", [
    "sample.max_new_tokens=-1", "sample.temperature=-0.1", "sample.temperature=nan", "sample.top_k=-1",
])
def test_sample_ranges(override):
    refused(override)


@pytest.mark.parametrize("override", ["s3.max_attempts=0", "s3.max_attempts=-1", "seed=-1", f"seed={2**32}"])
def test_s3_and_seed_ranges(override):
    refused(override)


def test_message_wording():
    assert refused("train.max_steps=0") == "train.max_steps=0: expected an integer >= 1"
    assert refused("train.lr=nan") == "train.lr=nan: expected a finite number > 0"
    assert refused("train.beta2=1") == "train.beta2=1.0: expected a number in [0, 1)"
    assert refused("train.spike_factor=0.5") == "train.spike_factor=0.5: expected 0 (off) or a number > 1"
    assert refused("train.timeout_s=-1") == "train.timeout_s=-1.0: expected a number >= 0 (seconds; 0: no limit)"


@pytest.mark.parametrize("override", [
    "model.vocab_size=0", "model.n_kv_heads=null", "model.ffn_dim=null", "tokenizer.vocab_size=266",
    "tokenizer.character_coverage=0.98", "tokenizer.character_coverage=1", "data.val_fraction=0",
    "data.min_chars=0", "data.shuffle_window=1", "data.tokenizer_actors=0", "train.min_lr_ratio=0",
    "train.min_lr_ratio=1", "train.warmup_steps=0", "train.weight_decay=0", "train.beta1=0", "train.grad_clip=0",
    "train.z_loss=0", "train.max_nonfinite_steps=0", "train.spike_factor=0", "train.spike_factor=1.01",
    "train.max_rollbacks=0", "train.timeout_s=0", "sample.max_new_tokens=0", "sample.temperature=0",
    "sample.top_k=0", "s3.max_attempts=1", "seed=0", f"seed={2**32 - 1}",
])
def test_edge_values_that_mean_something_load(override):
    load_config(overrides=[override])


def test_min_chars_above_max_chars():
    with pytest.raises(ConfigError, match=r"^data\.min_chars=11 exceeds data\.max_chars=10"):
        load_config(overrides=["data.min_chars=11", "data.max_chars=10"])
    assert load_config(overrides=["data.min_chars=10", "data.max_chars=10"]).data.max_chars == 10


def test_range_checks_come_before_divisions():
    # Zero heads or workers would otherwise fail inside the divisibility checks.
    with pytest.raises(ConfigError, match=r"^model\.n_heads=0"):
        load_config(overrides=["model.n_heads=0"])
    with pytest.raises(ConfigError, match=r"^train\.num_workers=0"):
        load_config(overrides=["train.num_workers=0"])


def test_every_numeric_field_has_a_range():
    for cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        numeric = {f.name for f in dataclasses.fields(cls)
                   if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}}
        assert numeric == set(cls.RANGES), cls.__name__


def test_defaults_and_every_preset_load():
    assert load_config() == Config()
    for name, preset in MODEL_PRESETS.items():
        cfg = load_config(overrides=[f"model.preset={name}"])
        assert cfg.model == preset
