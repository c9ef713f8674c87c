"""cluster/kuberay/: each manifest's header, followed step by step as a reader copies it, ends
with the client holding the credentials the cluster was given.

tests/unit/test_job_entrypoints.py checks that the headers create every Secret the manifests
read; this follows the header's commands in order, in bash, from an environment holding only
the submitter's S3 keys: `kubectl` keeps the Secrets the header creates (and hands them back
base64-encoded, as `kubectl get secret -o jsonpath` does), `ray` and `curl` record what they
were given, and the rest (`docker`, `aws`, `kubectl apply`, ...) do nothing. Then a `ray job
submit` sends the token of the Secret the manifest's `authOptions` names, and a request to the
served API sends the key of the Secret the pods read RAYLM_API_KEY from: a variable the header
never set is an empty token or key, which the cluster answers with 401.

And cluster/versions.env, which its header says scripts `source`, sources in bash and names
the image the cluster files run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
_PLACEHOLDER = re.compile(r"<([A-Za-z][\w-]*)>")

# The submitter's own environment: the S3 keys the headers put into the raylm-s3 Secret.
_SUBMITTER_ENV = {"AWS_ACCESS_KEY_ID": "id-from-the-shell", "AWS_SECRET_ACCESS_KEY": "secret-from-the-shell"}

# Stand-ins for the tools the headers call. Secrets live under $SECRETS/<name>/<key>;
# `ray` and `curl` append one JSON line each to $CALLS with their arguments (and ray the
# token variables it reads).
_TOOLS = r'''
kubectl() {
  if [ "$1 $2 $3" = "create secret generic" ]; then
    local name=$4 a kv; shift 4; mkdir -p "$SECRETS/$name"
    for a in "$@"; do
      case "$a" in --from-literal=*) kv=${a#--from-literal=}; printf %s "${kv#*=}" > "$SECRETS/$name/${kv%%=*}";; esac
    done
  elif [ "$1 $2" = "get secret" ]; then
    local name=$3 path key; shift 3
    while [ $# -gt 0 ]; do case "$1" in -o) path=$2; shift 2;; -o*) path=${1#-o}; shift;; *) shift;; esac; done
    key=${path#jsonpath=}; key=${key#\{.data.}; key=${key%\}}
    [ -f "$SECRETS/$name/$key" ] || { echo "Error from server (NotFound): secrets \"$name\" or key $key" >&2; return 1; }
    base64 -w0 < "$SECRETS/$name/$key"
  fi
}
docker() { :; }
aws() { echo '{"outputs": {"path": "s3://bucket/recipes/llama-1b/dpo"}}'; }
_record() { "$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"; }
ray() { _record ray "RAY_AUTH_MODE=${RAY_AUTH_MODE-}" "RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN-}" "$@"; }
curl() { _record curl "$@"; }
'''


def _header_commands(path: Path) -> str:
    """The commands of a manifest's header as a reader copies them: its comment lines indented
    as commands (`#   cmd`, continuation lines further in), in order, `<placeholders>` filled."""
    lines = []
    for ln in path.read_text().splitlines():
        if not ln.startswith("#"):
            break
        if ln.startswith("#   "):
            lines.append(ln[4:])
    return _PLACEHOLDER.sub(r"\1", "\n".join(lines)) + "\nwait\n"


def _follow_header(path: Path, tmp_path: Path) -> tuple[dict, list[list[str]]]:
    """Run the header in bash: the Secrets it leaves ({name: {key: value}}) and the calls of
    `ray` and `curl`."""
    secrets, calls = tmp_path / "secrets", tmp_path / "calls"
    secrets.mkdir()
    calls.touch()
    done = subprocess.run(["bash", "-e", "-c", _TOOLS + _header_commands(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
                               "SECRETS": str(secrets), "CALLS": str(calls), "HOME": str(tmp_path), **_SUBMITTER_ENV})
    assert done.returncode == 0, f"{path.name}: its header's commands fail in bash:\n{done.stderr}"
    made = {d.name: {f.name: f.read_text() for f in d.iterdir()} for d in secrets.iterdir()}
    return made, [json.loads(ln) for ln in calls.read_text().splitlines()]


def _secret_of(doc: dict, env_name: str) -> tuple[str, str] | None:
    """(secret, key) the manifest's pods read `env_name` from."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == env_name and "secretKeyRef" in node.get("valueFrom", {}):
                ref = node["valueFrom"]["secretKeyRef"]
                yield ref["name"], ref["key"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
    found = set(walk(doc))
    assert len(found) <= 1, f"{env_name} comes from several Secrets: {found}"
    return next(iter(found), None)


def _token_secret(doc: dict) -> str:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    return cluster["authOptions"]["secretName"]


needs_tools = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("base64") and shutil.which("openssl")),
                                 reason="the headers' commands need bash, base64 and openssl")


@needs_tools
@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_header_leaves_the_client_with_the_clusters_credentials(path, tmp_path):
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    secrets, calls = _follow_header(path, tmp_path)
    for call in calls:
        if call[0] == "ray" and call[3:5] == ["job", "submit"]:
            token = secrets[_token_secret(doc)]["auth_token"]
            assert call[1] == "RAY_AUTH_MODE=token" and call[2] == f"RAY_AUTH_TOKEN={token}", (
                f"{path.name}: the header's `ray job submit` runs without the token of Secret "
                f"{_token_secret(doc)} (RAY_AUTH_MODE and RAY_AUTH_TOKEN: {call[1:3]})")
        if call[0] == "curl":
            auth = [a for a in call if a.lower().startswith("authorization:")]
            assert auth, f"{path.name}: the header's curl sends no Authorization header: {call}"
            secret, key = _secret_of(doc, "RAYLM_API_KEY")
            wanted = secrets[secret][key]
            assert auth[0] == f"Authorization: Bearer {wanted}", (
                f"{path.name}: the header's curl sends {auth[0]!r}, not the key of Secret {secret} "
                f"(its header never sets the variable it sends, so the server answers 401)")


@needs_tools
def test_every_kuberay_header_is_followed():
    """The check above sees the commands that matter: a job submitted with the token, and a
    request to the served API with its key."""
    seen = set()
    for path in KUBERAY:
        text = _header_commands(path)
        seen |= {"submit"} if "ray job submit" in text else set()
        seen |= {"curl"} if re.search(r"^curl ", text, re.M) else set()
    assert seen == {"submit", "curl"}, seen


# --------------------------------------------------------------------------- cluster/versions.env


def _manifest_images() -> set[str]:
    """Every raylm image the KubeRay manifests and the launcher run."""
    found = set()
    for path in [*KUBERAY, REPO / "cluster" / "aws-gpu.yaml"]:
        found |= set(re.findall(r"^\s*(?:-\s*)?image:\s*\"?(\S+/raylm:[^\s\"]+)", path.read_text(), re.M))
    return found


@pytest.mark.skipif(not shutil.which("bash"), reason="sourcing cluster/versions.env needs bash")
def test_versions_env_sources_in_the_shell_as_its_header_says(tmp_path):
    """`source cluster/versions.env && docker build -t "${RAYLM_IMAGE/<registry>/$REGISTRY}" .`,
    as the file's header writes it: the shell reads every pin (an unquoted `<registry>` is two
    redirections, and `source` fails with RAYLM_IMAGE empty), the image it names is the one
    the cluster files run, and the tag it builds is the registry's."""
    versions = REPO / "cluster" / "versions.env"
    keys = re.findall(r"^([A-Z_][A-Z0-9_]*)=", versions.read_text(), re.M)
    assert {"RAY_VERSION", "RAY_BASE_IMAGE", "RAYLM_IMAGE"} <= set(keys), keys
    lines = [f'set -e; source "{versions}"; REGISTRY=registry.example.com/team',
             *[f'printf "%s\\0" "{k}=${{{k}}}"' for k in keys],
             'printf "TAG=%s\\0" "${RAYLM_IMAGE/<registry>/$REGISTRY}"']
    done = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert done.returncode == 0 and not done.stderr, (
        f"cluster/versions.env: `source` fails in bash: {done.stderr.strip()}")
    got = dict(item.split("=", 1) for item in done.stdout.split("\0") if item)
    empty = [k for k in keys if not got.get(k)]
    assert not empty, f"cluster/versions.env: the shell reads {empty} as empty"
    assert got["RAYLM_IMAGE"].startswith("<registry>/raylm:"), got
    assert got["TAG"] == got["RAYLM_IMAGE"].replace("<registry>", "registry.example.com/team"), got
    images = _manifest_images()
    assert images and images == {got["RAYLM_IMAGE"]}, (
        f"the cluster files run {sorted(images)}, cluster/versions.env pins RAYLM_IMAGE={got['RAYLM_IMAGE']}")
    assert not list(tmp_path.iterdir()), f"sourcing cluster/versions.env wrote {list(tmp_path.iterdir())}"
