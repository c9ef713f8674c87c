"""jobs/: the `ray job submit` commands written in the entrypoints' docstrings, the runtime_env
files' headers and the recipes' headers are commands that run, copied from the file as written.

tests/unit/test_cluster_manifests.py checks the commands in cluster/; these are the ones in
jobs/. Each command is copied from the file's text (a docstring as written in the source, a
comment without its `#`), its `<placeholders>` filled in, and run by bash with `ray` a shell
function that prints its arguments: continuation lines, quotes, `$VAR` and `$(...)` are the
shell's. Then:

- `ray job submit`'s own parser (Ray's click command) accepts its options, and the entrypoint
  after `--` is `python jobs/<file>.py` of a file in jobs/;
- a `--runtime-env FILE` exists and is a valid Ray runtime_env, and so is a
  `--runtime-env-json` value; lm-eval tasks (`eval --tasks`) get lm-eval from the image or the
  runtime_env, with pyproject's pin;
- raylm's own CLI reads the arguments (as raylm.cli.main does) for the subcommand the job file
  hands it;
- a recipe's command (`jobs/run.py --config RECIPE`) loads the recipe with the command's
  overrides, and no placeholder reaches a stage from the recipe file (the recipe refuses
  those when it loads).

And the KubeRay manifests' headers create every Secret (and key) the manifests read.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
_PLACEHOLDER = re.compile(r"<([A-Za-z][\w-]*)>")


def _sources() -> list[Path]:
    """Files in jobs/ whose text shows job commands: entrypoints, runtime_envs, recipes."""
    return sorted([*JOBS.glob("*.py"), *JOBS.glob("runtime_env*.yaml"), *(JOBS / "recipes").glob("*.yaml")])


def _text(path: Path) -> list[str]:
    """The lines a reader copies commands from: a .py file's docstring as written in the
    source (not as Python reads it: `\\` there is two backslashes to the reader), a YAML
    file's comments without their `#`."""
    text = path.read_text()
    if path.suffix == ".py":
        doc = ast.parse(text).body[0]
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), f"{path.name}: no docstring"
        return text.splitlines()[doc.lineno - 1:doc.end_lineno]
    return [ln.strip()[1:] for ln in text.splitlines() if ln.strip().startswith("#")]


def _blocks(lines: list[str]) -> list[str]:
    """From each `ray job submit` line to the end of the text, the indentation of the first
    line removed from every line (as a reader copying the block removes it): a shell reading
    it stops where the command ends."""
    out = []
    for i, line in enumerate(lines):
        if line.strip().startswith("ray job submit"):
            indent = len(line) - len(line.lstrip())
            out.append("\n".join(ln[indent:] if ln[:indent].isspace() else ln.lstrip() for ln in lines[i:]))
    return out


_FAKE_ENV = {"RAYLM_API_KEY": "k" * 32, "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}


def _shell_argv(block: str) -> list[str]:
    """The arguments `ray` gets when bash runs the first command of `block` (its `<placeholders>`
    filled in first, as the headers say): continuation lines, quotes, `$VAR` and `$(...)` as
    the shell has them. `ray` is a shell function here that prints its arguments and exits."""
    script = ('ray() { "$PYTHON" -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@"; exit 0; }\n'
              + _PLACEHOLDER.sub(r"\1", block))
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
                               **_FAKE_ENV})
    assert done.returncode == 0 and done.stdout.strip(), f"bash cannot run it: {done.stderr}\n{block}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commands() -> list[tuple[str, str]]:
    out = []
    for path in _sources():
        for k, block in enumerate(_blocks(_text(path))):
            out.append((f"{path.relative_to(REPO)}#{k + 1}", block))
    return out


COMMANDS = _commands()


def test_every_jobs_file_shows_a_command():
    """Every entrypoint and runtime_env in jobs/ shows its `ray job submit` command, so the
    checks below cannot pass empty."""
    shown = {where.split("#")[0] for where, _ in COMMANDS}
    for path in [*JOBS.glob("*.py"), *JOBS.glob("runtime_env*.yaml")]:
        assert str(path.relative_to(REPO)) in shown, f"{path.relative_to(REPO)}: no `ray job submit` command"


def _check_runtime_env(where: str, env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        pytest.fail(f"{where}: not a valid runtime_env: {e}")


def _job_subcommand(job: Path) -> list[str]:
    for node in ast.walk(ast.parse(job.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args
                and isinstance(node.args[0], ast.List)):
            return [e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
    raise AssertionError(f"{job.name}: no main([...]) call")


def _shown(block: str) -> str:
    """The block up to its first blank line, for messages."""
    return block.split("\n\n")[0]


@pytest.mark.parametrize("where,block", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_job_command_runs_as_written(where, block):
    import click
    from ray.dashboard.modules.job.cli import submit

    from raylm.cli import build_parser

    argv = _shell_argv(block)
    assert argv[:2] == ["job", "submit"], argv
    try:
        params = submit.make_context("submit", argv[2:]).params
    except click.UsageError as e:
        pytest.fail(f"{where}: `ray job submit` refuses it: {e}\n{argv}")
    entry = list(params["entrypoint"])
    assert "--" in argv and len(entry) >= 2 and re.fullmatch(r"python[\d.]*", entry[0]), (
        f"{where}: as the shell reads it, the command does not end in `-- python jobs/...`: {argv}\n{_shown(block)}")
    job = REPO / entry[1]
    assert entry[1].startswith("jobs/") and job.is_file(), f"{where}: {entry[1]} is not a file in jobs/"
    assert params["working_dir"] == ".", f"{where}: --working-dir {params['working_dir']} (the repository root)"
    runtime_env: dict = {}
    if params["runtime_env"]:
        path = REPO / params["runtime_env"]
        assert path.is_file(), f"{where}: --runtime-env {params['runtime_env']} does not exist"
        runtime_env = yaml.safe_load(path.read_text())
        _check_runtime_env(where, runtime_env)
    if params["runtime_env_json"]:
        runtime_env = json.loads(params["runtime_env_json"])
        _check_runtime_env(where, runtime_env)
        if "$" in block.split(" -- ")[0]:  # the shell fills it in from the submitter's environment
            assert set(runtime_env.get("env_vars", {}).values()) & set(_FAKE_ENV.values()), (where, runtime_env)

    err = io.StringIO()  # as raylm.cli.main reads them: overrides may sit anywhere on the line
    try:
        with contextlib.redirect_stderr(err):
            args, extra = build_parser().parse_known_args([*_job_subcommand(job), *entry[2:]])
    except SystemExit:
        pytest.fail(f"{where}: raylm's CLI refuses the arguments: {err.getvalue().strip().splitlines()[-1]}")
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    assert not unknown, f"{where}: raylm's CLI refuses the arguments {unknown}"
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "eval" and args.tasks:
        _check_brings_lm_eval(where, runtime_env)
    if args.command == "run":
        from raylm.config import ConfigError, to_dict
        from raylm.recipe import load_recipe, stage_config

        recipe_path, overrides = args.config or args.recipe, list(args.overrides)
        if args.config and args.recipe:
            overrides.insert(0, args.recipe)
        try:
            recipe = load_recipe(str(REPO / recipe_path), overrides)
            for stage in recipe.stages:
                fake = {s: {"path": f"{recipe.root}/{s}", "checkpoint": f"{recipe.root}/{s}", "corpus": ""}
                        for s in recipe.inputs_of(stage)}
                cfg = json.dumps(to_dict(stage_config(recipe, stage, fake)))
                assert not _PLACEHOLDER.search(cfg), f"{where}: stage {stage.name} keeps a placeholder: {cfg}"
        except ConfigError as e:
            pytest.fail(f"{where}: {e}\n{_shown(block)}")


def _check_brings_lm_eval(where: str, runtime_env: dict) -> None:
    """lm-eval tasks need lm-eval (pyproject's eval extra) on the cluster: in the image, or
    installed by the job's runtime_env with the extra's pin."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (wanted,) = [Requirement(r) for r in project["optional-dependencies"]["eval"] if Requirement(r).name == "lm-eval"]
    extras = re.findall(r"pip install [^\n]*'\.\[([\w,]+)\]'", (REPO / "Dockerfile").read_text())
    if any("eval" in e.split(",") for e in extras):
        return
    pip = runtime_env.get("pip") or []
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    found = [Requirement(r) for r in packages if Requirement(r).name == wanted.name]
    assert found, (f"{where}: --tasks runs lm-eval, which raylm's image does not install: the job's runtime_env "
                   f"must bring {wanted}")
    assert found[0].specifier == wanted.specifier, f"{where}: installs {found[0]}, pyproject's eval extra {wanted}"


def test_commands_are_read_as_a_shell_reads_them():
    """`\\\\` at a line's end is an escaped backslash, which ends the command there."""
    assert _shell_argv("ray job submit --address A \\\n  -- python jobs/x.py\nprose, it's") == [
        "job", "submit", "--address", "A", "--", "python", "jobs/x.py"]
    assert _shell_argv("ray job submit --address A \\\\\n  -- python jobs/x.py") == [
        "job", "submit", "--address", "A", "\\"]


# --------------------------------------------------------------------------- KubeRay Secrets


def _header(path: Path) -> str:
    lines = []
    for ln in path.read_text().splitlines():
        if not ln.startswith("#"):
            break
        lines.append(ln.lstrip("#"))
    return "\n".join(lines)


def _secret_refs(node, found: set) -> set:
    """(secret, key) a manifest reads without `optional: true`; authOptions' key is auth_token."""
    if isinstance(node, dict):
        auth = node.get("authOptions")
        if isinstance(auth, dict) and auth.get("secretName"):
            found.add((auth["secretName"], "auth_token"))
        ref = node.get("secretKeyRef")
        if isinstance(ref, dict) and not ref.get("optional"):
            found.add((ref["name"], ref["key"]))
        for v in node.values():
            _secret_refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _secret_refs(v, found)
    return found


def _created_secrets() -> set:
    """(secret, key) of every `kubectl create secret generic NAME --from-literal=KEY=...` in
    the manifests' headers."""
    out = set()
    for path in KUBERAY:
        text = re.sub(r"\\\n\s*", " ", _header(path))
        for m in re.finditer(r"kubectl create secret generic (\S+)([^\n]*)", text):
            out |= {(m.group(1), key) for key in re.findall(r"--from-literal=(\w+)=", m.group(2))}
    return out


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_header_names_every_secret_the_manifest_reads(path):
    """A Secret the pods read and the header does not mention leaves them in
    CreateContainerConfigError: the header's steps must make (or point to) each one."""
    refs = set()
    for doc in yaml.safe_load_all(path.read_text()):
        _secret_refs(doc, refs)
    assert refs
    header = _header(path)
    missing = sorted({name for name, _ in refs if name not in header})
    assert not missing, f"{path.name}: its header does not say to create the Secret(s) {missing} it reads"
    created = _created_secrets()
    absent = sorted(refs - created)
    assert not absent, f"{path.name}: no header in cluster/kuberay/ creates (secret, key) {absent}"
