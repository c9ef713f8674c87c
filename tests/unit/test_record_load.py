"""`--from-record RECORD.json`: a damaged record is one line naming it, and the recorded settings
are validated once the command's overrides are laid over them, so that an override mends a
record whose settings a later raylm refuses (here train.warmup_steps past train.max_steps)."""

import dataclasses
import json

import pytest

from raylm.cli import _config, build_parser, main
from raylm.config import Config, ConfigError, TrainConfig, to_dict
from raylm.record import load_record


def record(tmp_path, cfg: Config, stage: str = "pretrain") -> str:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"stage": stage, "config": to_dict(cfg)}, indent=1))
    return str(path)


def refused_schedule() -> Config:
    # Built directly, as an earlier raylm recorded it: nothing validates it here.
    return Config(train=dataclasses.replace(TrainConfig(), max_steps=1000, warmup_steps=2000))


def test_an_override_mends_a_record_whose_settings_are_now_refused(tmp_path):
    path = record(tmp_path, refused_schedule())
    args, _ = build_parser().parse_known_args(["pretrain", "--from-record", path, "train.max_steps=4000"])
    cfg = _config(args)
    assert (cfg.train.max_steps, cfg.train.warmup_steps) == (4000, 2000)


def test_without_the_override_it_is_refused_in_one_line(tmp_path):
    path = record(tmp_path, refused_schedule())
    args, _ = build_parser().parse_known_args(["pretrain", "--from-record", path])
    with pytest.raises(ConfigError, match=r"^train.warmup_steps=2000 exceeds train.max_steps=1000"):
        _config(args)


def test_a_record_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "record.json"
    path.write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(ConfigError, match=f"^{path}: not a JSON run record"):
        load_record(str(path))
    assert main(["pretrain", "--from-record", str(path), f"storage={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err


@pytest.mark.parametrize("config, fragment", [
    ([], "config: expected a mapping"),
    ({"train": {"lrr": 1}}, "unknown config key 'train.lrr'"),
])
def test_a_bad_recorded_config_names_the_record(tmp_path, config, fragment):
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"stage": "pretrain", "config": config}))
    with pytest.raises(ConfigError) as e:
        load_record(str(path))
    assert str(e.value).startswith(f"{path}: {fragment}")


def test_a_recorded_config_round_trips(tmp_path):
    cfg = Config(name="again", train=dataclasses.replace(TrainConfig(), max_steps=77, lr=1e-3))
    stage, loaded = load_record(record(tmp_path, cfg, "sft"))
    assert stage == "sft" and loaded == cfg
