"""Credentials never reach an output: `raylm run` with the S3 server's secret key in its
environment (as AWS_SECRET_ACCESS_KEY) and a fake password in a URL, one stage passing
(the tokenizer, written to S3) and one failing (the data stage, whose endpoint URL carries
the planted password and points nowhere). Neither secret may appear in stdout, stderr or any
file the run wrote, in S3 or on disk.

The whole chain on a Ray cluster (metrics, checkpoint meta, Ray's job logs) is searched the
same way by tests/integration/test_cluster_job.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLANTED = "PlantedUrlSecret-7f3a9c1e5b"  # a password in a URL, recognisable in any output


def test_no_output_holds_a_planted_secret(s3_server, s3_prefix, tmp_path):
    from raylm import storage

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"document {i}: ray jobs, recipes and token authentication" for i in range(500)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: secrets
storage: {s3_prefix}
data: {{path: {corpus}}}
tokenizer: {{vocab_size: 300, sample_bytes: 20000}}
stages:
  tokenizer: {{}}
  data:
    s3.endpoint_url: "http://AKIDPLANTED:{PLANTED}@127.0.0.1:9"
    s3.max_attempts: 1
""")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the s3_server fixture's AWS_* variables included
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "raylm.cli", "run", str(recipe)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    # The passing stage ran and wrote to S3; the failing one stopped with one line naming
    # the endpoint (its password masked).
    assert result.returncode == 2, result.stderr[-3000:]
    assert "recipe: tokenizer: done" in result.stdout
    assert "raylm: error:" in result.stderr and "***@127.0.0.1:9" in result.stderr, result.stderr[-2000:]
    files = storage.list_files(s3_prefix)
    assert any(f.uri.endswith("stages/tokenizer.json") for f in files)
    assert not any(f.uri.endswith("stages/data.json") for f in files)

    outputs = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode()}
    outputs.update({f.uri: storage.read_bytes(f.uri) for f in files})
    outputs.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != recipe})
    planted = {"AWS_SECRET_ACCESS_KEY": s3_server.secret_key.encode(), "URL password": PLANTED.encode()}
    found = [f"{what} in {where}" for where, data in outputs.items() for what, v in planted.items() if v in data]
    assert not found, f"planted secrets appear in outputs: {found}"
