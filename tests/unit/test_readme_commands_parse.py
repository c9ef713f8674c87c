"""README.md is the user's manual: its commands, flags, config keys and examples must be what
the code accepts. These checks read README.md itself, so a flag renamed in the parser, a key
renamed in raylm/config.py, or a README example edited into something the parser refuses,
fails here rather than at a user's terminal. Parsing only: nothing is trained or served."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from raylm import cli
from raylm.config import Config, ServeConfig, TuneConfig, load_config, load_serve_config, to_dict

README = Path(__file__).resolve().parents[2] / "README.md"

# Subcommands whose KEY=VALUE words are run config overrides (load_config's).
CONFIG_COMMANDS = {"quickstart", "pretrain", "sft", "dpo", "tune", "eval", "tokenizer train", "data prepare"}


def _readme_lines() -> list[str]:
    return README.read_text(encoding="utf-8").split("\n")


def _code_block_commands() -> list[tuple[int, str]]:
    """(line number, command) for every `raylm ...` line in a fenced code block, with
    backslash continuations joined; lines with placeholders (RUN, DIR, <x>, ...) are left out."""
    lines = _readme_lines()
    out, inblock, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            inblock = not inblock
        elif inblock:
            m = re.search(r"(?:^|&& )(raylm\s+[a-z].*)$", line)
            if m:
                cmd, start = m.group(1), i + 1
                while cmd.rstrip().endswith("\\"):
                    i += 1
                    cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
                if not re.search(r"\.\.\.|<[a-z]|\b[A-Z]{3,}\b", " ".join(shlex.split(cmd, comments=True))):
                    out.append((start, cmd))
        i += 1
    return out


def _parse(argv: list[str]):
    """What `raylm.cli.main` does with the line before it runs the subcommand."""
    parser = cli.build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(argv)
            extra = [a for a in extra if a != "--debug"]
            extra = cli._place_run(args, extra)
            unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit:
        raise AssertionError(f"raylm {' '.join(argv)}: {err.getvalue().strip()}") from None
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _command_name(args) -> str:
    return f"{args.command} {args.sub}" if getattr(args, "sub", None) else args.command


def test_readme_has_commands_to_check():
    """The extraction finds the README's examples (a change of its fences would skip them all)."""
    cmds = [c for _, c in _code_block_commands()]
    assert len(cmds) >= 20
    for sub in ("quickstart", "tokenizer train", "data prepare", "pretrain", "sft", "dpo", "tune", "generate",
                "export", "serve", "eval", "run"):
        assert any(c.startswith(f"raylm {sub}") for c in cmds), sub


@pytest.mark.parametrize("line,cmd", _code_block_commands())
def test_readme_command_parses_and_its_overrides_load(line, cmd):
    """Each `raylm` command line in the README's code blocks is accepted by the real parser
    (no unknown flag, every required argument there), and its dotted overrides are keys and
    values the config takes."""
    args = _parse(shlex.split(cmd, comments=True)[1:])
    name = _command_name(args)
    overrides = [o for o in getattr(args, "overrides", []) if isinstance(o, str)]
    if name in CONFIG_COMMANDS:
        if name == "tune":
            overrides = [o for o in overrides if not o.startswith("tune.")]
        load_config(overrides=overrides, check_memory=False)  # raises ConfigError naming the key
    elif name == "serve":
        load_serve_config(overrides)
    elif name == "run" and (README.parent / args.recipe).is_file():  # a shipped recipe, with the line's overrides
        from raylm.recipe import load_recipe

        load_recipe(str(README.parent / args.recipe), overrides)


def test_cli_docstring_commands_parse():
    """The examples in `raylm --help` (the module docstring) parse with the real parser."""
    cmds = [l.strip() for l in cli.__doc__.split("\n") if l.strip().startswith("raylm ")]
    assert len(cmds) >= 10
    for cmd in cmds:
        _parse(shlex.split(cmd, comments=True)[1:])


def _known_keys() -> set[str]:
    keys = set()

    def walk(d, prefix):
        for k, v in d.items():
            keys.add(prefix + k)
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(to_dict(Config()), "")
    keys |= {f"serve.{f.name}" for f in dataclasses.fields(ServeConfig)}
    keys |= {f"tune.{f.name}" for f in dataclasses.fields(TuneConfig)}
    return keys | {"model.preset"}


# Dotted words in the README that are no config key: file names, record fields, Ray's API, and
# the misspelt key the README shows being refused.
NOT_KEYS = {"data.bad_records", "train.lrr", "serve.shutdown", "serve.get_app_handle"}


def test_readme_config_keys_exist():
    """Every dotted config key the README names (`train.lr`, `serve.port`, `tune.scheduler`, ...)
    is one the config, ServeConfig or TuneConfig has."""
    known = _known_keys()
    missing = []
    for n, line in enumerate(_readme_lines(), 1):
        for key in re.findall(r"(?<![\w./-])((?:data|dpo|eval|model|s3|sample|tokenizer|train|serve|tune)"
                              r"\.[a-z0-9_]+(?:\.[a-z0-9_]+)*)", line):
            if key in known or key in NOT_KEYS or re.search(r"\.(py|json|yaml|safetensors|gguf|model|jsonl)$", key):
                continue
            missing.append(f"README.md:{n}: {key}")
    assert not missing, missing


def test_readme_plan_table_examples_run():
    """The `raylm plan` examples of the README's planning table parse, plan without error, and
    print the parameter count and step count the table shows."""
    from raylm.plan import format_table, make_plan

    lines = _readme_lines()
    head = next(l for l in lines if l.startswith("| `raylm plan` |"))
    examples = re.findall(r"`(--size [^`]+)`", head)
    params = next(l for l in lines if l.startswith("| parameters |")).split("|")[2:-1]
    steps = next(l for l in lines if l.startswith("| steps, peak LR, warmup |")).split("|")[2:-1]
    assert len(examples) == len(params) == len(steps) >= 4
    for example, n_params, n_steps in zip(examples, params, steps):
        a = _parse(["plan", *shlex.split(example)])
        plan = make_plan(a.size, a.gpus, a.nodes, a.tokens, a.language, a.domain, a.seq_len, a.mfu,
                         a.train_tokens, a.memory_gb, a.data or "", a.name, a.replicate_degree, a.document_mask)
        table = format_table(plan)
        assert f"{n_params.strip()} parameters" in table, (example, n_params)
        step_count = re.match(r"\s*(\d{1,3}(?:,\d{3})*), ", n_steps).group(1)  # "2,441, 3e-3, 244"
        assert f"{step_count} steps" in table, (example, n_steps)


def test_plan_name_help_states_the_default_name():
    """`raylm plan --help` said the default run name was <size>-<devices><device>, but the name
    is made from the preset --size names, not the text given: --size 125m named the run
    gpt2-124m-..., not 125m-... The help's pattern, filled in, must give the name plan writes."""
    import yaml

    from raylm.plan import make_plan, recipe_yaml

    parser = cli.build_parser()
    plan_parser = next(a for a in parser._actions if a.dest == "command").choices["plan"]
    help_text = next(a for a in plan_parser._actions if a.dest == "name").help
    template = re.search(r"default: (<\w+>-<\w+><\w+>)", help_text).group(1)
    a = _parse(["plan", "--size", "125m", "--gpus", "8xH100", "--nodes", "2"])
    plan = make_plan(a.size, a.gpus, a.nodes, a.tokens, a.language, a.domain, a.seq_len, a.mfu, a.train_tokens,
                     a.memory_gb, a.data or "", a.name, a.replicate_degree, a.document_mask)
    name = yaml.safe_load(recipe_yaml(plan))["name"]
    filled = (template.replace("<size>", a.size).replace("<preset>", plan.size)
              .replace("<devices>", "16").replace("<device>", "h100"))
    assert filled == name == "gpt2-124m-16h100"
