"""cluster/aws-gpu.yaml: the steps in its header leave the cluster's Ray token readable by its
owner alone, and off the terminal.

The header makes the token with `ray get-auth-token --generate`, which writes ~/.ray/auth_token
with the process's umask (0644 under the usual 022: every user of the machine could read it)
and prints it. `file_mounts` then copies the file with its mode to every node (rsync -a), under
/tmp/ray_tmp_mount/<cluster>/ on each host. Whoever reads it can submit jobs to the cluster: run
any code on its GPUs, with its S3 role.

The header's commands are followed in bash as a reader copies them (the block that makes the
token, in order), with Ray's real `ray get-auth-token` and every other `ray`, `aws` and
`docker` call a no-op, in a HOME of the test's own and under umask 022.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "cluster" / "aws-gpu.yaml"
RAY = Path(sys.executable).with_name("ray")
RAY_CLI = str(RAY) if RAY.exists() else shutil.which("ray")


def _token_block() -> str:
    """The header's run of command lines (`#   cmd`) that makes the token, comment marks removed
    and `<placeholders>` filled in, as the header says to."""
    blocks, cur = [], []
    for line in LAUNCHER.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            cur.append(line[4:])
        elif cur:
            blocks.append(cur)
            cur = []
    blocks.append(cur)
    found = [b for b in blocks if any("get-auth-token" in ln for ln in b)]
    assert found, f"{LAUNCHER.name}: no header command makes the Ray token (ray get-auth-token --generate)"
    return re.sub(r"<([A-Za-z][\w-]*)>", r"\1", "\n".join(found[0]))


@pytest.mark.skipif(not (RAY_CLI and shutil.which("bash")), reason="needs bash and Ray's `ray` command")
def test_header_leaves_the_token_private(tmp_path):
    stubs = (f'ray() {{ if [ "$1" = get-auth-token ]; then "{RAY_CLI}" "$@"; fi; }}\n'
             'aws() { :; }\ndocker() { :; }\n')
    done = subprocess.run(["bash", "-e", "-c", "umask 022\n" + stubs + _token_block() + "\nwait\n"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
                               "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, f"{LAUNCHER.name}: the header's commands fail in bash:\n{done.stderr}"
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file(), f"{LAUNCHER.name}: the header's commands made no ~/.ray/auth_token"
    mode = stat.S_IMODE(os.stat(token).st_mode)
    assert not mode & 0o077, (f"{LAUNCHER.name}: the header leaves ~/.ray/auth_token mode {mode:o}, readable by "
                              f"others (and copied so to every node); chmod 600 it")
    secret = token.read_text().strip()
    assert secret and secret not in done.stdout + done.stderr, f"{LAUNCHER.name}: the header prints the token"
