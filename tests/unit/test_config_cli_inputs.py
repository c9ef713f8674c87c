"""What a user types into a config or a command line: every mistake is one line naming the key
or the file, never a traceback, never a value other than the one written, and never a secret
echoed back. In process, without Ray: the library call a subcommand ends in is replaced by one
that stops with what it got."""

from __future__ import annotations

import pytest

from raylm.cli import main
from raylm.config import ConfigError, load_config, load_serve_config

SECRET = "SECRET123"


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through (not an Exception)."""


def stop_at(monkeypatch, target: str) -> None:
    def reached(*args, **kwargs):
        e = Reached(*args)
        e.kwargs = kwargs
        raise e

    monkeypatch.setattr(target, reached)


def error_of(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("override", ["train.lr=" + "9" * 400, "train.timeout_s=" + "9" * 400])
def test_an_integer_past_the_float_range_is_a_config_error(override):
    """float() of such an int raised OverflowError, a traceback."""
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_an_int_setting_past_the_float_range_is_a_range_error():
    """Range.check took math.isfinite of the int, which overflows."""
    with pytest.raises(ConfigError, match=r"serve\.port=9+: expected an integer in \[1, 65535\]"):
        load_serve_config(["port=" + "9" * 400])


def test_a_number_too_long_to_read_is_a_config_error(tmp_path):
    """Python refuses to convert an int of more than 4,300 digits (a ValueError from YAML's loader)."""
    with pytest.raises(ConfigError, match=r"^seed=9{20}\.\.\.: Exceeds the limit"):
        load_config(overrides=["seed=" + "9" * 5000])
    path = tmp_path / "run.yaml"
    path.write_text("seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"config file {path}"):
        load_config(str(path))


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("override,value", [
    ("name=run #2", "run #2"),  # YAML read "run": the run named "run" was resumed
    ("data.path=corpus #1.txt", "corpus #1.txt"),
    ("name=#3", "#3"),  # YAML read null: "expected str, got NoneType"
    ("data.path=&corpus", "&corpus"),  # an anchor, null too
    ("data.path='a #b'", "a #b"),  # quoted: YAML's text, as before
])
def test_override_text_is_never_cut_at_a_comment(override, value):
    key, _ = override.split("=", 1)
    section, _, field = key.rpartition(".")
    cfg = load_config(overrides=[override])
    assert getattr(getattr(cfg, section) if section else cfg, field) == value


@pytest.mark.parametrize("override", ["model.n_kv_heads=null", "model.n_kv_heads=~", "model.n_kv_heads=NULL"])
def test_null_still_means_none(override):
    assert load_config(overrides=[override]).model.n_kv_heads is None


@pytest.mark.parametrize("override", [f"api_key=[{SECRET}]", f"api_key=!{SECRET}", f"api_key={SECRET}: x"])
def test_a_secret_setting_of_the_wrong_shape_is_not_echoed(override):
    with pytest.raises(ConfigError, match="api_key") as e:
        load_serve_config([override])
    assert SECRET not in str(e.value)


def test_a_one_line_error_never_shows_url_credentials(capsys):
    """The one line goes to stderr, which a Ray job's logs keep."""
    err = error_of(["pretrain", "--config", f"http://user:{SECRET}@host/run.yaml"], capsys)
    assert SECRET not in err and "http://***@host/run.yaml" in err
    err = error_of(["pretrain", f"storage=s3://user:{SECRET}@<bucket>/runs"], capsys)
    assert SECRET not in err and "placeholder" in err


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("text,problem", [
    ("train:\n  lrr: 1\n", "unknown config key 'train.lrr'"),
    ("train:\n  lr: abc\n", "train.lr='abc': expected float"),
    ("train: 5\n", "train: expected a mapping"),
])
def test_a_wrong_key_or_type_in_a_config_file_names_the_file(tmp_path, text, problem):
    """The same key may come from --from-record, --config or an override: say which."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert problem in str(e.value) and f"config file {path}" in str(e.value)


def test_config_given_twice_is_refused(tmp_path, monkeypatch, capsys):
    """argparse kept the second --config alone, dropping the first file's settings."""
    stop_at(monkeypatch, "raylm.pipeline.pretrain")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {lr: 0.01}\n")
    b.write_text("train: {max_steps: 5}\n")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(a), "--config", str(b)])
    assert e.value.code == 2
    assert "--config given twice" in capsys.readouterr().err


# --------------------------------------------------------------------------- the run among overrides


@pytest.mark.parametrize("argv", [
    ["eval", "RUN", "eval.workers=0"],  # the overrides once took RUN, and the run "eval.workers=0"
    ["eval", "eval.workers=0", "RUN"],
    ["eval", "eval.workers=0", "--limit", "3", "RUN"],
    ["eval", "RUN", "--limit", "3", "eval.workers=0"],
])
def test_eval_finds_its_run_among_the_overrides(argv, tmp_path, monkeypatch):
    stop_at(monkeypatch, "raylm.eval.run.evaluate_run")
    run = str(tmp_path / "runs" / "lr=3e-4")  # an '=' in a path is still a path
    with pytest.raises(Reached) as e:
        main([run if a == "RUN" else a for a in argv])
    got_run, cfg = e.value.args
    assert got_run == run and cfg.eval.workers == 0


@pytest.mark.parametrize("argv", [["serve", "RUN", "max_batch_size=8"], ["serve", "max_batch_size=8", "RUN"]])
def test_serve_finds_its_run_among_the_overrides(argv, tiny_run, monkeypatch):
    """`serve max_batch_size=8 RUN` served the run "max_batch_size=8" with the override RUN
    (a real run: `raylm serve` reads its checkpoint before Ray starts)."""
    import raylm.pipeline
    import raylm.serve.app

    monkeypatch.setattr(raylm.pipeline, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(raylm.serve.app, "check_port_free", lambda cfg: None)
    stop_at(monkeypatch, "raylm.serve.app.start")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = tiny_run
    with pytest.raises(Reached) as e:
        main([run if a == "RUN" else a for a in argv])
    got_run, cfg = e.value.args
    assert got_run == run and cfg.max_batch_size == 8


@pytest.mark.parametrize("value", ["-1", "x"])
def test_eval_refuses_a_negative_fewshot_count(value, tmp_path, monkeypatch, capsys):
    """lm-eval ran `--num-fewshot -1` as zero-shot, and the results gave no sign of it."""
    stop_at(monkeypatch, "raylm.eval.run.evaluate_run")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "run"), "--num-fewshot", value])
    assert e.value.code == 2 and "--num-fewshot" in capsys.readouterr().err


def test_eval_passes_a_fewshot_count_on(tmp_path, monkeypatch):
    stop_at(monkeypatch, "raylm.eval.run.evaluate_run")
    with pytest.raises(Reached) as e:
        main(["eval", str(tmp_path / "run"), "--num-fewshot", "0"])
    assert e.value.kwargs["num_fewshot"] == 0
