"""Config loading: a model.preset in a later layer replaces the model settings beneath it, YAML
1.1 number forms never change a value silently, and secret fields are redacted."""

from __future__ import annotations

import re

import pytest
import yaml

from raylm.config import MODEL_PRESETS, Config, ConfigError, ServeConfig, load_config, to_dict


# --------------------------------------------------------------------------- preset layers


def test_preset_override_replaces_the_model_of_a_recorded_base():
    """A record sets every model field; `model.preset=` over it once changed nothing."""
    recorded = to_dict(Config())  # the tiny model, every field written out
    cfg = load_config(base=recorded, overrides=["model.preset=gpt2-124m"])
    assert cfg.model == MODEL_PRESETS["gpt2-124m"]


def test_preset_in_a_config_file_replaces_the_model_beneath_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: gpt2-124m, n_layers: 2}\n")
    cfg = load_config(str(path), base=to_dict(Config()))
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (768, 12, 2)  # its own fields on top


def test_fields_given_beside_a_preset_still_apply_whatever_their_order():
    base = to_dict(Config())
    for overrides in (["model.n_layers=2", "model.preset=gpt2-124m"], ["model.preset=gpt2-124m", "model.n_layers=2"]):
        cfg = load_config(base=base, overrides=overrides)
        assert (cfg.model.dim, cfg.model.n_layers) == (768, 2), overrides


def test_model_fields_without_a_preset_still_merge_key_by_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: gpt2-124m}\n")
    cfg = load_config(str(path), overrides=["model.n_layers=3"])
    assert (cfg.model.dim, cfg.model.n_layers) == (768, 3)


# --------------------------------------------------------------------------- YAML 1.1 numbers


@pytest.mark.parametrize("text", ["1.10", "010", "0777", "12:30", "0x1F", "1_000", "2024-01-01"])
def test_a_string_key_takes_the_text_as_written(text, tmp_path):
    """YAML 1.1 reads these as 1.1, 8, 511, 750, 31, 1000 and a date: a run named `1.10` was
    written to runs/1.1, a tokenizer path 0777 read from ./511."""
    cfg = load_config(None, [f"name={text}", f"tokenizer.path={text}", f"sample.prompts=[{text}]"])
    assert (cfg.name, cfg.tokenizer.path, cfg.sample.prompts) == (text, text, (text,))
    path = tmp_path / "run.yaml"
    path.write_text(f"name: {text}\ndata: {{text_field: {text}}}\n")
    cfg = load_config(str(path))
    assert (cfg.name, cfg.data.text_field) == (text, text)


@pytest.mark.parametrize("override, shown", [
    ("train.max_steps=010", "octal (8)"),
    ("train.lr=010", "octal (8)"),
    ("train.max_steps=1:30", "base-60 number 90"),
    ("train.lr=1:30", "base-60 number 90"),
    ("train.timeout_s=1:00:00", "base-60 number 3600"),
])
def test_a_number_key_refuses_forms_yaml_reads_as_another_value(override, shown):
    with pytest.raises(ConfigError, match=f"^{re.escape(override.split('=')[0])}=.*{re.escape(shown)}"):
        load_config(None, [override])


def test_numbers_read_from_text_are_plain_and_dump():
    cfg = load_config(None, ["train.max_steps=100", "train.lr=0.5", "train.num_workers=1", "model.n_kv_heads=2",
                             "train.max_steps=0x10", "seed=00"])
    assert (cfg.train.max_steps, cfg.seed) == (16, 0)
    for value in (cfg.train.max_steps, cfg.train.lr, cfg.train.num_workers, cfg.model.n_kv_heads, cfg.seed):
        assert type(value) in (int, float), type(value)
    yaml.safe_dump(to_dict(cfg))  # a subclass of int would not dump


# --------------------------------------------------------------------------- secrets


def test_redacted_dict_and_repr_hide_the_api_key():
    cfg = ServeConfig(api_key="sk-very-secret")
    assert to_dict(cfg, redact=True)["api_key"] == "***"
    assert to_dict(cfg)["api_key"] == "sk-very-secret"  # only what is written down is redacted
    assert to_dict(ServeConfig(), redact=True)["api_key"] == ""  # no key: nothing to hide
    assert "sk-very-secret" not in repr(cfg)


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("overrides", [["train.lr=1e-3", "train={max_steps: 5}"],
                                       ["train={max_steps: 5}", "train.lr=1e-3"]])
def test_a_section_given_whole_adds_to_its_keys_given_before(overrides):
    """`train.lr=1e-3 train={max_steps: 5}` once dropped train.lr without a word."""
    cfg = load_config(None, overrides)
    assert (cfg.train.lr, cfg.train.max_steps) == (1e-3, 5)


# --------------------------------------------------------------------------- S3 URIs


@pytest.mark.parametrize("key", ["storage", "init_from", "data.path", "data.val_path", "tokenizer.path"])
@pytest.mark.parametrize("value", ["s3://", "s3:///", "s3:/bucket/runs", "S3://bucket/runs", "s3:bucket"])
def test_an_s3_uri_without_a_bucket_is_refused(key, value):
    """`storage=s3://$BUCKET` with BUCKET unset gave the run directory 's3:/quickstart': a local
    path, written without a word."""
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}='{re.escape(value)}': not an S3 URI; expected "
                                          f"s3://bucket/prefix$"):
        load_config(None, [(key, value)])


def test_s3_uris_with_a_bucket_and_local_paths_pass():
    cfg = load_config(None, [("storage", "s3://bucket"), ("data.path", "s3data/x.txt"), ("init_from", "s3://b/r/")])
    assert cfg.run_dir == "s3://bucket/quickstart"
