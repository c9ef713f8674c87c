"""The job commands written in jobs/ (entrypoints' docstrings, runtime_env headers, recipes)
never hand a credential to the job through its runtime_env.

Ray keeps a job's runtime_env with the job (the Jobs API and the dashboard show it) and its
runtime-env agent writes it, `env_vars` and all, in plain text into runtime_env_agent.log on
every node that starts a process for the job ("Creating runtime env: {...}", "Unused runtime
env {...}"). jobs/serve.py's command passed RAYLM_API_KEY that way, and jobs/runtime_env.yaml's
header the S3 keys (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN): each ended up in Ray's log files
on the cluster's nodes. A credential comes from the environment the nodes run in (a Kubernetes
Secret, an instance role, the environment `ray start` ran in), which a job's driver and workers
inherit.

The commands are read as test_job_entrypoints reads them: copied from the file, run by bash
with `ray` printing its arguments (so `$VAR` and `$(...)` are filled in, from an environment
holding fake credentials), then parsed by `ray job submit`'s own option parser.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.unit.test_job_entrypoints import _FAKE_ENV, COMMANDS, _shell_argv

REPO = Path(__file__).resolve().parents[2]
# Names of variables that hold a credential (raylm.serve.app.API_KEY_ENV among them).
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|AUTH", re.I)


def _runtime_env(argv: list[str]) -> dict:
    """The runtime_env `ray job submit` would send for these arguments."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit

    params = submit.make_context("submit", argv[2:]).params
    runtime_env = params["runtime_env"] and str(REPO / params["runtime_env"])
    return parse_runtime_env_args(runtime_env=runtime_env, runtime_env_json=params["runtime_env_json"],
                                  working_dir=params["working_dir"]) or {}


def test_the_commands_are_read():
    assert COMMANDS and any("serve.py" in block for _, block in COMMANDS)


@pytest.mark.parametrize("where,block", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_no_credential_travels_in_the_runtime_env(where, block):
    env = _runtime_env(_shell_argv(block))
    env_vars = env.get("env_vars") or {}
    named = sorted(k for k in env_vars if _SECRET_NAME.search(k))
    assert not named, (f"{where}: passes {named} in the job's runtime_env, which Ray writes into "
                       f"runtime_env_agent.log on every node and shows in the Jobs API; the credential must "
                       f"come from the nodes' environment (a Secret, an instance role, `ray start`'s environment)")
    text = json.dumps(env)
    leaked = sorted(k for k, v in _FAKE_ENV.items() if v in text)
    assert not leaked, f"{where}: the runtime_env carries the submitter's {leaked}"


def test_runtime_env_files_hold_no_credential():
    for path in sorted((REPO / "jobs").glob("runtime_env*.yaml")):
        env = yaml.safe_load(path.read_text()) or {}
        named = sorted(k for k in (env.get("env_vars") or {}) if _SECRET_NAME.search(k))
        assert not named, f"{path.relative_to(REPO)}: env_vars {named}"
