"""The tiny recipe as a Ray job on a real Ray cluster with token authentication.

A head started with `ray start --head` on 127.0.0.1 (free ports, its own --temp-dir, so its
address file never makes it the default cluster of any other `ray.init` on this machine),
with RAY_AUTH_MODE=token and a token generated into a file only this test knows. The S3
server's credentials reach the job the way an instance role or a Kubernetes Secret would:
through the environment the node started in, never through a file or the runtime_env.

Then, with the real `ray job submit` CLI: the tiny recipe runs to SUCCEEDED with its data
and runs in S3, the outputs are checked in storage (every stage record, one lineage chain
from the export back to the tokenizer, the export loads in transformers and answers a chat
prompt), a resubmission skips every stage, and the Jobs API answers 401 without the token
and 403 with a wrong one. No output of the run holds the S3 secret. Only the processes this
test started are stopped (never `ray stop`, which ends every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

# A cluster start, eight stages and a resubmission: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
RECIPE = "jobs/recipes/tiny-cpu.yaml"
# The tiny recipe at test scale: the smallest model and data that still run every stage.
TEST_SCALE = [
    "model.dim=64", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=64", "tokenizer.sample_bytes=300000",
    "stages.tokenizer.tokenizer.vocab_size=512", "stages.data.data.dedup=none", "train.micro_batch_size=4",
    "train.global_batch_size=8", "train.eval_batches=1", "train.num_workers=1", "train.log_every=1", "stages.pretrain.samples=false",
    "stages.pretrain.train.max_steps=3", "stages.sft.train.max_steps=2", "stages.dpo.train.max_steps=2",
    "stages.pretrain.train.eval_every=3", "stages.sft.train.eval_every=2", "stages.dpo.train.eval_every=2",
]
ALL_STAGES = ("tokenizer", "data", "pretrain", "sft", "dpo", "eval", "export", "serve")
_RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default worker-port range: a --port there is refused


def _free_port(held: list) -> int:
    """A free loopback port outside Ray's worker-port range, kept bound (in `held`) until
    every port is chosen so none is handed out twice."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
        if s.getsockname()[1] not in _RAY_WORKER_PORTS:
            return s.getsockname()[1]


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else shutil.which("ray")


def _get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


class Head:
    """A Ray head of this test's own: `ray start --head --block` as a child process, so that
    everything Ray launches is in its process tree (and its temp dir names them all)."""

    def __init__(self, env: dict):
        held: list = []
        self.gcs_port, self.dashboard_port = _free_port(held), _free_port(held)
        others = {flag: _free_port(held) for flag in (
            "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
        for s in held:
            s.close()
        # Short: Ray's unix sockets live under it, and their paths are limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.token = secrets.token_hex(32)
        token_file = Path(self.temp_dir) / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
        cmd = [_ray_cli(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=8",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               *[f"{flag}={port}" for flag, port in others.items()]]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 240) -> bool:
        """True once `ray start` says the node is up and the Jobs API answers; False if
        `ray start` gave up (on a loaded machine the raylet can miss Ray's fixed 30 s)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            started = "Ray runtime started" in (Path(self.temp_dir) / "ray-start.log").read_text()
            if started and _get(f"{self.address}/api/jobs/", self.token) == 200:
                return True
            time.sleep(2)
        raise TimeoutError(f"the Ray head's Jobs API did not answer within {timeout}s")

    def processes(self) -> list[psutil.Process]:
        """What this head launched: the tree under `ray start`, and any process (a daemonised
        one) whose command line names this head's own temp dir or GCS port."""
        found = {}
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        marks = (self.temp_dir, f"127.0.0.1:{self.gcs_port}", f"--gcs_server_port={self.gcs_port}")
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if any(m in cmdline for m in marks):
                found[p.pid] = p
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.log.close()

    def submit(self, submission_id: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [_ray_cli(), "job", "submit", "--address", self.address, "--submission-id", submission_id,
               "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
               "python", "jobs/run.py", "--config", RECIPE, *args]
        return subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def job_status(self, submission_id: str) -> str:
        out = subprocess.run([_ray_cli(), "job", "status", "--address", self.address, submission_id],
                             env=self.env, capture_output=True, text=True, timeout=60)
        text = (out.stdout + out.stderr).lower()  # "Job 'x' succeeded"
        for status in ("succeeded", "failed", "stopped", "running", "pending"):
            if f"' {status}" in text:
                return status.upper()
        return text


@pytest.fixture(scope="module")
def head(s3_server):
    # The S3 credentials (the s3_server fixture put them in os.environ) and the serving API
    # key reach the job through the node's environment, as a role or a Secret would.
    env = {**os.environ, "RAYLM_API_KEY": secrets.token_hex(16)}
    for attempt in range(3):
        h = Head(env)
        try:
            if h.wait_ready():
                break
            log = (Path(h.temp_dir) / "ray-start.log").read_text()[-1500:]
        except BaseException:
            _stop(h)
            raise
        _stop(h)
    else:
        pytest.fail(f"ray start failed 3 times; the last said:\n{log}")
    try:
        yield h
    finally:
        _stop(h)


def _stop(h: Head) -> None:
    h.stop()
    left = [p for p in h.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    shutil.rmtree(h.temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray head survived: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def recipe_runs(head, s3_server):
    """The recipe submitted twice (the second must skip everything); the storage root."""
    prefix = f"cluster-job-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{s3_server.bucket}/{prefix}"
    held: list = []
    port = _free_port(held)
    for sock in held:
        sock.close()
    # Bits per byte on a few documents, not the whole built-in corpus (the stage's default).
    from raylm import storage as st

    small = f"{storage}/eval-corpus/small.jsonl"
    st.write_text(small, "".join(json.dumps({"text": f"Ray runs job {i} on a cluster."}) + "\n" for i in range(20)))
    args = [f"storage={storage}", f"stages.serve.serve.port={port}", f"stages.eval.corpora=[{small}]", *TEST_SCALE]
    first = head.submit("raylm-recipe-1", *args)
    second = head.submit("raylm-recipe-2", *args) if first.returncode == 0 else None
    yield {"storage": storage, "root": f"{storage}/tiny-cpu", "first": first, "second": second, "args": args,
           "statuses": [head.job_status("raylm-recipe-1"), second and head.job_status("raylm-recipe-2")]}
    s3_server.delete_prefix(prefix + "/")


def _stage_records(root: str) -> dict:
    from raylm import storage

    return {name: json.loads(storage.read_text(f"{root}/stages/{name}.json"))
            for name in ALL_STAGES}


def test_recipe_job_succeeds_with_one_lineage(recipe_runs):
    first = recipe_runs["first"]
    assert first.returncode == 0, f"job failed:\n{first.stdout[-4000:]}\n{first.stderr[-2000:]}"
    assert recipe_runs["statuses"][0] == "SUCCEEDED"
    records = _stage_records(recipe_runs["root"])
    # One chain: each stage names the key and content hash of the stage it read, and they are
    # that stage's own.
    chain = [("serve", "dpo"), ("eval", "dpo"), ("export", "dpo"), ("dpo", "sft"), ("sft", "pretrain"),
             ("pretrain", "data"), ("data", "tokenizer")]
    for stage, parent in chain:
        inp = records[stage]["inputs"][parent]
        assert inp["key"] == records[parent]["key"], (stage, parent)
        assert inp["sha256"] == records[parent]["outputs"]["sha256"], (stage, parent)
    assert records["pretrain"]["inputs"]["tokenizer"]["sha256"] == records["tokenizer"]["outputs"]["sha256"]
    # The served model's lineage, as raylm reads it back: one chain to the tokenizer.
    from raylm.recipe import lineage, load_recipe

    recipe = load_recipe(str(REPO / RECIPE), recipe_runs["args"])
    assert [r["stage"] for r in lineage(recipe, "serve")] == ["serve", "dpo", "sft", "pretrain", "data", "tokenizer"]
    # The run really trained in S3 and the DPO run starts from the SFT checkpoint it names.
    from raylm import storage
    from raylm.checkpoint import COMMIT_MARKER

    for stage in ("pretrain", "sft", "dpo"):
        out = records[stage]["outputs"]
        assert out["checkpoint"].startswith(recipe_runs["root"])
        assert storage.exists(f"{out['checkpoint']}/{COMMIT_MARKER}")
    dpo_record = json.loads(storage.read_text(f"{records['dpo']['outputs']['path']}/record.json"))
    assert dpo_record["parent"]["checkpoint"] == records["sft"]["outputs"]["checkpoint"]


def test_served_model_answers(recipe_runs, head):
    """The end of the chain: the serve stage's OpenAI API, still up after the job ended,
    answers a chat request with the key from the node's environment, and refuses one without.
    This head's environment does not ask for HAProxy, so Serve's Python proxy serves it: the
    ingress a joined cluster gets unless its own environment says otherwise."""
    from urllib.parse import urlsplit

    from tests.netutil import listener

    assert recipe_runs["first"].returncode == 0
    served = _stage_records(recipe_runs["root"])["serve"]["outputs"]
    assert listener(urlsplit(served["url"]).port) == "ray::ProxyActor"
    body = json.dumps({"model": served["model"], "max_tokens": 4,
                       "messages": [{"role": "user", "content": "word after cat: dog cat fox"}]}).encode()

    def post(key):
        req = urllib.request.Request(f"{served['url']}/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, None

    status, answer = post(head.env["RAYLM_API_KEY"])
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant", answer
    # A sampled answer may end at its first token (the tiny model picking end-of-turn: CI saw
    # it once): what must hold is a finished answer whose usage counts what it sent.
    choice, usage = answer["choices"][0], answer["usage"]
    assert isinstance(choice["message"]["content"], str) and usage["prompt_tokens"] >= 1, answer
    assert choice["finish_reason"] in ("stop", "length"), answer
    assert usage["completion_tokens"] >= 1 or choice["finish_reason"] == "stop", answer
    assert post(None)[0] == 401, f"the served API answered without the key: {served}"


def test_exported_model_answers(recipe_runs, tmp_path):
    """The end of the chain as a user meets it: the export, loaded by transformers, answers a
    chat prompt (the served answer, while `raylm serve` is not part of the recipe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm import storage

    assert recipe_runs["first"].returncode == 0
    export = _stage_records(recipe_runs["root"])["export"]["outputs"]["path"]
    local = tmp_path / "hf"
    storage.download_dir(export, str(local))
    model, tok = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    x = tok.apply_chat_template([{"role": "user", "content": "word after cat: dog cat fox"}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > x["input_ids"].shape[1]


def test_resubmitted_recipe_skips_every_stage(recipe_runs):
    second = recipe_runs["second"]
    assert second is not None and second.returncode == 0, second and second.stdout[-3000:]
    assert recipe_runs["statuses"][1] == "SUCCEEDED"
    summary = json.loads(second.stdout[second.stdout.index("{\n"):second.stdout.rindex("}") + 1])
    assert set(summary) == set(ALL_STAGES)
    assert all(s["skipped"] for s in summary.values()), summary
    assert "running (key" not in second.stdout


def _listening(p: psutil.Process) -> list:
    try:
        return [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_head_is_nobody_elses_default_cluster(head):
    """`ray start` records its address for later `ray.init()` calls; with its own --temp-dir
    that record stays there, so no other program on the machine joins this head by default."""
    from ray._common.utils import get_ray_address_file

    assert Path(get_ray_address_file(head.temp_dir)).read_text().strip().endswith(f":{head.gcs_port}")
    default = Path(get_ray_address_file(None))
    assert not default.exists() or f":{head.gcs_port}" not in default.read_text()


def test_jobs_api_wants_the_token(head):
    # The dashboard (and the Jobs API it serves) listens on loopback only. (The GCS and raylet
    # ports listen on every interface in Ray 2.60; token auth is what guards them.)
    listening = {(c.laddr.ip, c.laddr.port) for p in head.processes() for c in _listening(p)}
    assert {ip for ip, port in listening if port == head.dashboard_port} == {"127.0.0.1"}, listening
    url = f"{head.address}/api/jobs/"
    assert _get(url) == 401
    assert _get(url, "0" * 64) == 403
    assert _get(url, head.token) == 200


def test_no_output_holds_the_s3_secret(recipe_runs, head, s3_server):
    """stdout and stderr of both submissions, every object the run wrote in S3 (records,
    metrics, checkpoint meta, data cards, the export) and the job's logs on the head."""
    from raylm import storage

    planted = {"S3 secret": s3_server.secret_key.encode(), "API key": head.env["RAYLM_API_KEY"].encode()}
    assert all(len(v) >= 16 for v in planted.values())
    outputs = {}
    for name in ("first", "second"):
        for stream in ("stdout", "stderr"):
            if recipe_runs[name] is not None:
                outputs[f"{name} submission's {stream}"] = getattr(recipe_runs[name], stream).encode()
    files = storage.list_files(recipe_runs["storage"])
    assert len(files) > 20
    outputs.update({f.uri: storage.read_bytes(f.uri) for f in files})
    logs = [p for p in Path(head.temp_dir).glob("session_*/logs/**/*") if p.is_file()]
    assert any(p.name.startswith("job-driver-raylm-recipe-1") for p in logs), [p.name for p in logs][:20]
    outputs.update({f"head log {p.name}": p.read_bytes() for p in logs})
    found = [f"{what} in {where}" for where, data in outputs.items() for what, v in planted.items() if v in data]
    assert not found, f"planted secrets appear in outputs: {found}"
