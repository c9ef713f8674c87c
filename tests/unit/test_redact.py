"""Credentials in URLs (an endpoint such as http://user:secret@host:9000) never reach error
messages or run records."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from raylm import storage
from raylm.config import load_config, to_dict
from raylm.record import RECORD, write_record
from raylm.storage import StorageError, redact_url

SECRET = "SECRET123"
ENDPOINT = f"http://user:{SECRET}@127.0.0.1:1"  # port 1: nothing listens, the connection is refused


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch):
    """Dummy credentials, so that requests are really sent (and fail at the connection),
    and no real AWS setup is read or reached."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.clear_cache()
    yield
    storage.clear_cache()


@pytest.mark.parametrize("text,expected", [
    ("http://user:secret@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
    ("HTTPS://key@host/path@v1", "HTTPS://***@host/path@v1"),
    ("s3://key:secret@bucket/key", "s3://***@bucket/key"),
    ("at http://u:p@ss@host:1/x and http://a:b@c", "at http://***@host:1/x and http://***@c"),
    ('{"url": "http://host:9000", "mail": "a@b"}', '{"url": "http://host:9000", "mail": "a@b"}'),
    ("s3://bucket/key@v1", "s3://bucket/key@v1"),  # '@' in a key is not userinfo
    ("http://host:9000/a@b", "http://host:9000/a@b"),
    ("/data/a@b.jsonl", "/data/a@b.jsonl"),
    ("", ""),
])
def test_redact_url(text, expected):
    assert redact_url(text) == expected
    assert redact_url(expected) == expected  # idempotent


def config():
    return load_config(overrides=[f"s3.endpoint_url={ENDPOINT}", "s3.max_attempts=1"])


def assert_redacted(e: BaseException) -> None:
    msg = str(e)
    assert SECRET not in msg and "127.0.0.1:1" in msg, msg
    assert "cannot reach the S3 endpoint http://***@127.0.0.1:1 " in msg, msg
    assert SECRET not in str(pickle.loads(pickle.dumps(e)))  # as Ray ships it from a worker


@pytest.mark.parametrize("call", [
    lambda s3, tmp: storage.read_bytes("s3://bucket/key", s3),
    lambda s3, tmp: storage.exists("s3://bucket/key", s3),
    lambda s3, tmp: storage.list_files("s3://bucket/prefix/*.jsonl", s3),
    lambda s3, tmp: storage.write_text("s3://bucket/key", "x", s3),
    lambda s3, tmp: storage.upload_dir(str(tmp), "s3://bucket/prefix", s3),  # pyarrow, not boto3
], ids=["read", "exists", "list", "write", "upload_dir"])
def test_unreachable_endpoint_error_hides_credentials(tmp_path, call):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(StorageError) as e:
        call(config().s3, tmp_path)
    assert_redacted(e.value)
    assert SECRET not in e.value.uri + e.value.problem


def test_every_storage_error_hides_credentials():
    # Not an endpoint at all: a URL given where a path belongs.
    with pytest.raises(StorageError, match=r"^http://\*\*\*@host/x: unsupported scheme") as e:
        storage.read_bytes(f"http://user:{SECRET}@host/x")
    assert SECRET not in e.value.uri
    assert SECRET not in storage._unreachable(config().s3)


@pytest.mark.parametrize("endpoint", [f"ftp://user:{SECRET}@host:21", f"user:{SECRET}@host:9000"])
def test_malformed_endpoint_error_hides_credentials(endpoint):
    s3 = load_config(overrides=[f"s3.endpoint_url={endpoint}"]).s3
    with pytest.raises(StorageError, match=r"\*\*\*@host.*must start with http") as e:
        storage.filesystem("s3://bucket/key", s3)
    assert SECRET not in str(e.value)


def test_run_record_hides_credentials(tmp_path):
    cfg = load_config(overrides=[f"s3.endpoint_url={ENDPOINT}", f"storage={tmp_path}", "name=run"])
    uri = write_record(cfg, "pretrain")
    assert uri == os.path.join(str(tmp_path), "run", RECORD)
    text = open(uri).read()
    assert SECRET not in text
    assert json.loads(text)["config"]["s3"]["endpoint_url"] == "http://***@127.0.0.1:1"


def test_to_dict_redacts_only_when_asked():
    cfg = config()
    assert to_dict(cfg)["s3"]["endpoint_url"] == ENDPOINT  # the live config keeps what works
    redacted = to_dict(cfg, redact=True)
    assert redacted["s3"]["endpoint_url"] == "http://***@127.0.0.1:1"
    assert {**redacted, "s3": None} == {**to_dict(cfg), "s3": None}  # nothing else changes
