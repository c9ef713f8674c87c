"""The command line's settings, in process and without Ray: what --from-record, --resume and
the job entrypoints' documented commands turn into, and what `raylm --help` promises. The
library call each subcommand ends in is replaced by one that stops with the config it got."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

from raylm import cli
from raylm.cli import main
from raylm.config import Config, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through (not an Exception)."""


def stop_at(monkeypatch, module: str, name: str) -> None:
    def reached(*args, **kwargs):
        raise Reached(args[0])

    monkeypatch.setattr(f"{module}.{name}", reached)


def config_of(argv: list[str]) -> Config:
    with pytest.raises(Reached) as e:
        main(argv)
    return e.value.args[0]


def error_of(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- --from-record


def write_record(path: Path, stage: str, **settings) -> str:
    cfg = load_config(overrides=[f"stage={stage}", *(f"{k}={v}" for k, v in settings.items())])
    path.write_text(json.dumps({"stage": stage, "config": to_dict(cfg)}))
    return str(path)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_posttrain_from_record_keeps_the_recorded_settings(stage, tmp_path, monkeypatch, capsys):
    """Defaults <- the record <- the command line: the stage's defaults and the name derived
    from --from are beneath the record (they once replaced its settings)."""
    stop_at(monkeypatch, "raylm.posttrain", "posttrain")
    rec = write_record(tmp_path / "record.json", stage, name="my-run", init_from="runs/old",
                       **{"train.lr": 5e-5, "train.max_steps": 777})
    cfg = config_of([stage, "--from", "runs/base", "--from-record", rec])
    assert (cfg.name, cfg.train.lr, cfg.train.max_steps) == ("my-run", 5e-5, 777)
    assert (cfg.stage, cfg.init_from) == (stage, "runs/base")  # --from is the command line's
    cfg = config_of([stage, "--from", "runs/base", "--from-record", rec, "train.max_steps=5", "name=again"])
    assert (cfg.name, cfg.train.lr, cfg.train.max_steps) == ("again", 5e-5, 5)
    # Without a record: the stage's defaults and the derived name.
    cfg = config_of([stage, "--from", "runs/base"])
    assert (cfg.name, cfg.train.max_steps) == (f"base-{stage}", cli.STAGE_DEFAULTS[stage]["train"]["max_steps"])
    # A record of another stage is named, not run as this one.
    rec = write_record(tmp_path / "pretrain.json", "pretrain", name="base")
    err = error_of([stage, "--from", "runs/base", "--from-record", rec], capsys)
    assert err == (f"raylm: error: --from-record {rec}: the record of a pretrain stage, not {stage}; rerun it with "
                   f"`raylm pretrain --from-record`")


# --------------------------------------------------------------------------- tune --resume


@pytest.mark.parametrize("extra,named", [
    (["--space", "/nonexistent/space.yaml"], "--space"),
    (["tune.num_samples=99"], "tune.num_samples=99"),
    (["train.lr=0.123"], "train.lr=0.123"),
    (["--data", "corpus.jsonl"], "data.path='corpus.jsonl'"),
    (["--config", "CONFIG"], "model.n_layers=2"),
])
def test_tune_resume_refuses_what_it_would_not_use(extra, named, tmp_path, monkeypatch, capsys):
    """A resumed search runs its saved space and settings: anything else given with --resume
    is refused in one line (it was ignored), before the search is looked for."""
    stop_at(monkeypatch, "raylm.tune", "resume")
    (tmp_path / "proxy.yaml").write_text("model: {n_layers: 2}\n")
    extra = [str(tmp_path / "proxy.yaml") if a == "CONFIG" else a for a in extra]
    err = error_of(["tune", "--resume", "name=s1", f"storage={tmp_path}", *extra], capsys)
    assert err == (f"raylm: error: tune --resume: {named} is not taken: a resumed search keeps its saved space "
                   f"and settings (only name=, storage= and s3.* apply); start a new search (another name=) to "
                   f"change them")


def test_tune_resume_takes_where_the_search_is(tmp_path, monkeypatch):
    stop_at(monkeypatch, "raylm.tune", "resume")
    cfg = config_of(["tune", "--resume", "name=s1", f"storage={tmp_path}", "s3.endpoint_url=http://127.0.0.1:9000",
                     "s3.region=eu-west-1"])
    assert (cfg.name, cfg.storage, cfg.s3.endpoint_url, cfg.s3.region) == (
        "s1", str(tmp_path), "http://127.0.0.1:9000", "eu-west-1")


# --------------------------------------------------------------------------- jobs/*.py


# Where each subcommand starts work: the config it would run with stops there.
STOPS = {
    "pretrain": ("raylm.pipeline", "pretrain"), "quickstart": ("raylm.pipeline", "pretrain"),
    "sft": ("raylm.posttrain", "posttrain"), "dpo": ("raylm.posttrain", "posttrain"),
    "prepare": ("raylm.pipeline", "preflight"), "tune": ("raylm.tune", "tune"),
    "eval": ("raylm.eval.run", "evaluate_run"), "run": ("raylm.recipe", "run_recipe"),
    "serve": ("raylm.pipeline", "init_ray"),  # jobs/serve.py: --detach, on the cluster it is submitted to
}


def job_commands() -> list[tuple[str, list[str]]]:
    """(job, argv for raylm.cli.main) for every `python jobs/X.py ...` in a job's docstring."""
    out = []
    for path in sorted((REPO / "jobs").glob("*.py")):
        tree = ast.parse(path.read_text())
        call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "main")
        prefix = [e.value for e in call.args[0].elts if isinstance(e, ast.Constant)]
        doc = re.sub(r"\\\n", " ", ast.get_docstring(tree))
        for m in re.finditer(rf"python jobs/{path.stem}\.py (.*)", doc):
            out.append((path.stem, prefix + shlex.split(m.group(1))))
    assert len(out) >= len(STOPS), out
    return out


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("job,argv", job_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_job_docstring_commands_work_as_written(job, argv, with_config, tmp_path, monkeypatch):
    """Each job's documented command reaches the work with a valid config, with its `--config`
    (an empty file, as any config may be) and without it: the docstrings say it may be left out."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAYLM_API_KEY", "a-key-long-enough-for-the-server-0123456789")  # jobs/serve.py passes it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").symlink_to(REPO / "jobs")  # the working directory is the repository's
    for name in ("run.yaml", "proxy.yaml", "space.yaml"):
        (tmp_path / name).write_text("{}\n")
    if not with_config and "--config" in argv and job != "run":  # a recipe's --config is the recipe
        i = argv.index("--config")
        argv = argv[:i] + argv[i + 2:]
    command = next(a for a in argv if a in STOPS)
    if command == "serve":  # a job runs with RAY_ADDRESS set, which `serve --detach` needs
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    if "--resume" in argv:
        stop_at(monkeypatch, "raylm.tune", "resume")
    else:
        stop_at(monkeypatch, *STOPS[command])
    assert config_of(argv) is not None


# --------------------------------------------------------------------------- --help


def test_help_names_the_subcommands_that_take_config_and_overrides():
    """`raylm --help` once said every subcommand takes --config and dotted overrides; generate,
    export, plan, report and serve do not."""
    parser = cli.build_parser()
    takes = set()
    for name, sub in _subcommands(parser):
        options = {o for a in sub._actions for o in a.option_strings}
        positionals = {a.dest for a in sub._actions if not a.option_strings}
        if name != "run" and "--config" in options and "overrides" in positionals:
            takes.add(name)
    assert takes == {"quickstart", "pretrain", "sft", "dpo", "tune", "tokenizer train", "data prepare", "eval"}
    text = " ".join(parser.format_help().split())
    claim = re.search(r"The subcommands ([a-z ,]+?) take `--config FILE.yaml` and dotted overrides", text)
    assert claim, text
    assert {n.strip() for n in re.split(r",| and ", claim.group(1)) if n.strip()} == takes
    rest = text[claim.end():]  # what the others take, said after
    for name in ("run", "serve", "generate", "export", "report", "plan"):
        assert re.search(rf"\b{name}\b", rest), name


def _subcommands(parser, prefix=""):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                nested = list(_subcommands(sub, f"{prefix}{name} "))
                yield from nested or [(prefix + name, sub)]
