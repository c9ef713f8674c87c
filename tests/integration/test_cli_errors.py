"""Bad input through the real command line: one line naming the problem, no traceback,
exit code 2, and nothing left behind that a later run would take for complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def raylm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raylm: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_unknown_config_key(tmp_path):
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}", "train.lrr=1e-3", cwd=tmp_path))
    assert "train.lrr" in line


def test_wrong_type(tmp_path):
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}", "train.max_steps=lots", cwd=tmp_path))
    assert "train.max_steps" in line and "lots" in line


def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  preset: tiny\n  widht: 3\n")
    line = one_line_error(raylm("pretrain", "--config", str(tmp_path / "run.yaml"), cwd=tmp_path))
    assert "model.widht" in line


def test_missing_corpus_path(tmp_path):
    missing = tmp_path / "nope" / "corpus.jsonl"
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(missing), cwd=tmp_path))
    assert str(missing) in line
    assert not list((tmp_path / "runs").glob("*/tokenizer/tokenizer.model"))


def test_empty_corpus_directory(tmp_path):
    (tmp_path / "corpus").mkdir()
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(tmp_path / "corpus"),
                                cwd=tmp_path))
    assert str(tmp_path / "corpus") in line and "no corpus files" in line


def test_empty_corpus_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(tmp_path / "empty.jsonl"),
                                cwd=tmp_path))
    assert "empty.jsonl" in line and "empty" in line


def test_text_field_that_does_not_exist(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document number {i} " * 20}) + "\n" for i in range(50)))
    line = one_line_error(raylm("pretrain", f"storage={tmp_path}/runs", "--data", str(corpus),
                                "data.text_field=content", cwd=tmp_path))
    assert "docs.jsonl:1" in line and "'content'" in line and "body" in line
    assert not (tmp_path / "runs" / "quickstart" / "tokenizer").exists()


def test_help_explains_every_subcommand(tmp_path):
    for args in (["--help"], ["pretrain", "--help"], ["quickstart", "--help"], ["data", "prepare", "--help"],
                 ["tokenizer", "train", "--help"], ["generate", "--help"]):
        proc = raylm(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "usage: raylm" in proc.stdout
    assert "train.lr=3e-4" in raylm("--help", cwd=tmp_path).stdout


# --------------------------------------------------------------------------- before Ray starts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A real tokenizer: given one, `pretrain` and `data prepare` used to start Ray (minutes
    on a busy machine) before they listed the corpus."""
    from raylm.config import load_config
    from raylm.corpus import write_builtin_corpus
    from raylm.pipeline import train_tokenizer_from

    corpus = tmp_path_factory.mktemp("tokcorpus")
    write_builtin_corpus(str(corpus), min_bytes=300_000)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    cfg = load_config(overrides=[f"data.path={corpus}", "tokenizer.vocab_size=512", "tokenizer.sample_bytes=300000"])
    return train_tokenizer_from(cfg, str(out)).path


@pytest.fixture
def ray_tmp():
    """An empty RAY_TMPDIR, short enough for the Unix sockets Ray puts under it."""
    path = Path(tempfile.mkdtemp(prefix="raylm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("case", ["glob", "glob_prepare", "tokenizer", "s3_endpoint", "unfinished_prepare"])
def test_checks_that_need_no_cluster_fail_before_ray_starts(case, tmp_path, tokenizer_dir, ray_tmp):
    """Each fails in one line, and Ray never starts: a local Ray instance always creates its
    session directory under RAY_TMPDIR, which stays empty."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "some text " * 50}) + "\n")
    unfinished = tmp_path / "prepared"
    shard = unfinished / "attempt-20250101-000000-0123abcd" / "train" / "shard-00000.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"PAR1")
    pretrain = ["pretrain", f"storage={tmp_path}/runs", f"tokenizer.path={tokenizer_dir}", "--data"]
    args, expect = {
        "glob": ([*pretrain, f"{tmp_path}/nothing/*.jsonl"], [f"{tmp_path}/nothing/*.jsonl", "no corpus files found"]),
        "glob_prepare": (["data", "prepare", "--data", f"{tmp_path}/nothing/*.jsonl", "--tokenizer", tokenizer_dir,
                          "--out", f"{tmp_path}/out"], [f"{tmp_path}/nothing/*.jsonl", "no corpus files found"]),
        "tokenizer": ([*pretrain, str(corpus), f"tokenizer.path={tmp_path}/no-tok"],
                      [f"tokenizer {tmp_path}/no-tok: not found", "raylm tokenizer train"]),
        "s3_endpoint": ([*pretrain, "s3://raylm-corpus/docs", "s3.endpoint_url=http://127.0.0.1:1",
                         "s3.max_attempts=1"],
                        ["s3://raylm-corpus/docs", "cannot reach the S3 endpoint http://127.0.0.1:1"]),
        "unfinished_prepare": ([*pretrain, str(unfinished)],
                               [f"{unfinished}: an unfinished prepared dataset (shards but no manifest.json",
                                f"raylm data prepare --data <corpus> --out {unfinished}"]),
    }[case]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster to join would hide a start
    env.update(RAY_TMPDIR=str(ray_tmp), AWS_ACCESS_KEY_ID="fake-key", AWS_SECRET_ACCESS_KEY="fake-secret")
    proc = raylm(*args, cwd=tmp_path, env=env)
    assert not list(ray_tmp.iterdir()), "Ray started:\n" + proc.stdout + proc.stderr
    line = one_line_error(proc)
    for needle in expect:
        assert needle in line, line


def test_generate_options_are_range_checked_before_loading(tmp_path):
    for args, key in ((["--temperature", "-1"], "sample.temperature=-1.0"), (["--max-new-tokens", "-3"],
                                                                            "sample.max_new_tokens=-3"),
                      (["--top-k", "-2"], "sample.top_k=-2")):
        line = one_line_error(raylm("generate", str(tmp_path / "no-run"), *args, cwd=tmp_path))
        assert key in line


def test_serve_on_a_port_in_use_names_it_before_ray_starts(tmp_path, ray_tmp):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(ray_tmp)
        proc = raylm("serve", str(tmp_path / "run"), "--port", str(port), cwd=tmp_path, env=env)
    assert not list(ray_tmp.iterdir()), "Ray started:\n" + proc.stdout + proc.stderr
    line = one_line_error(proc)
    assert f"serve.port={port}" in line and "in use" in line, line


def test_resume_with_nothing_to_resume_fails_before_any_stage(tmp_path, ray_tmp):
    """`pretrain --resume` of a run that has no checkpoint: one line, before the tokenizer,
    the data or Ray (it used to do all three, and write a run record, first)."""
    (tmp_path / "corpus.txt").write_text("some text to train a tokenizer on. " * 400)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    proc = raylm("pretrain", "--resume", "name=nosuch", f"storage={tmp_path}/runs", "--data",
                 str(tmp_path / "corpus.txt"), cwd=tmp_path, env=env)
    line = one_line_error(proc)
    assert f"--resume: no complete checkpoint under {tmp_path}/runs/nosuch" in line, line
    assert not list(ray_tmp.iterdir()), "Ray started"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json")), "something was written"
