"""An S3 endpoint that never answers a connection (a firewall dropping packets), without a server."""

import socket

import pytest

from raylm import storage
from raylm.config import S3Config
from raylm.storage import StorageError


@pytest.fixture
def dropping_endpoint(monkeypatch):
    """http://127.0.0.1:PORT whose listen queue is full, so the kernel drops every further
    connection attempt, as a firewall that drops packets does."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    storage.clear_cache()
    yield f"http://127.0.0.1:{port}"
    storage.clear_cache()
    filler.close()
    server.close()


@pytest.mark.timeout(40)
def test_an_endpoint_that_drops_connections_fails_in_seconds(dropping_endpoint):
    """boto3 waited botocore's default 60 s for each connection and retried it: a wrong endpoint
    behind a firewall took 8 minutes (8 attempts) to fail, each boto3 call of a run."""
    with pytest.raises(StorageError, match="Connect timeout on endpoint URL"):
        storage.exists("s3://b/x", S3Config(endpoint_url=dropping_endpoint, max_attempts=1))
