"""Command-line options checked where argparse reads them, and the config layers of `data
prepare` and --from-record with a model preset."""

from __future__ import annotations

import json

import pytest

from raylm import cli
from raylm.cli import main
from raylm.config import MODEL_PRESETS, Config, to_dict


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through."""


def stop_training(monkeypatch) -> None:
    def reached(cfg, *a, **k):
        raise Reached(cfg)

    monkeypatch.setattr("raylm.pipeline.pretrain", reached)
    monkeypatch.setattr("raylm.posttrain.posttrain", reached)


def test_from_record_with_a_preset_trains_the_preset(tmp_path, monkeypatch):
    rec = tmp_path / "record.json"
    rec.write_text(json.dumps({"stage": "pretrain", "config": to_dict(Config())}))
    stop_training(monkeypatch)
    with pytest.raises(Reached) as e:
        main(["pretrain", "--from-record", str(rec), "model.preset=gpt2-124m"])
    assert e.value.args[0].model == MODEL_PRESETS["gpt2-124m"]


def test_data_prepare_never_checks_seq_len_against_a_preset(tmp_path, capsys):
    """`data prepare` trains no model: data.seq_len is not checked against model.max_seq_len,
    even where --config names a preset (which replaces the model settings beneath it)."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny}\ndata: {seq_len: 512}\n")
    assert main(["data", "prepare", "--out", str(tmp_path / "out"), "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "raylm: error: data prepare needs --data (or data.path)"


@pytest.mark.parametrize("argv", [["pretrain"], ["sft", "--from", "runs/x"], ["dpo", "--from", "runs/x"]])
@pytest.mark.parametrize("value", ["-2", "-10", "abc", "1.5"])
def test_max_failures_refuses_what_ray_would_take_as_no_limit(argv, value, capsys, monkeypatch):
    """Ray Train reads any negative max_failures as no limit: a run that fails deterministically
    would restart forever. -1 is the documented way to ask for that."""
    stop_training(monkeypatch)  # where the value was taken: never a real run
    with pytest.raises(SystemExit) as e:
        main([*argv, "--max-failures", value])
    assert e.value.code == 2
    assert "argument --max-failures" in capsys.readouterr().err


def test_max_failures_takes_counts_and_minus_one():
    for value, want in (("0", 0), ("3", 3), ("-1", -1)):
        args, _ = cli.build_parser().parse_known_args(["pretrain", "--max-failures", value])
        assert args.max_failures == want


def test_generate_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--max-new-tokens N tokens to sample", "--temperature TEMPERATURE sampling temperature; 0: greedy",
                 "--top-k K sample among the K most likely", "--seed SEED sampling seed"):
        assert text in out, text


@pytest.mark.parametrize("value", ["-1", str(2**63), str(2**64), "1.5", "x"])
def test_generate_seed_out_of_range_is_refused_before_anything_loads(value, capsys):
    """torch's generators take seeds up to 2**64 - 1, and prompt i takes seed + i: a larger one
    failed with a traceback only after the model had loaded. Refused by argparse (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "no-such-run", "--prompt", "a", "--seed", value])
    assert e.value.code == 2 and "argument --seed" in capsys.readouterr().err


def test_generate_seed_takes_its_range():
    for value in ("0", "7", str(2**63 - 1)):
        args, _ = cli.build_parser().parse_known_args(["generate", "run", "--seed", value])
        assert args.seed == int(value)
