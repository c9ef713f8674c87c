"""Shared fixtures. S3: one SeaweedFS server per test session (see tests/s3server.py)."""

import uuid

import pytest

from tests.s3server import S3Server, WeedNotFound, patched_environ, weed_binary


@pytest.fixture(scope="session")
def s3_server():
    """A running S3 server; the AWS_* variables point at it for the whole session."""
    try:
        weed_binary()
    except WeedNotFound as e:
        pytest.skip(str(e))
    from raylm import storage

    with S3Server() as server, patched_environ(server.env()):
        storage.clear_cache()  # clients cached earlier know neither endpoint nor credentials
        yield server
    storage.clear_cache()


@pytest.fixture
def s3_prefix(s3_server):
    """A fresh, empty `s3://bucket/test-<uuid>`, deleted after the test."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield f"s3://{s3_server.bucket}/{prefix}"
    s3_server.delete_prefix(prefix + "/")


@pytest.fixture(scope="module")
def prepared(request, ray_local, s3_server):
    """The small corpus, tokenizer and prepared blocks (tests.small.prepare_small) under this
    test module's own prefix in the bucket, made once per module and removed afterwards."""
    from tests.small import prepare_small

    prefix = f"{request.module.__name__.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:8]}"
    yield prepare_small(f"s3://{s3_server.bucket}/{prefix}")
    s3_server.delete_prefix(prefix + "/")


@pytest.fixture(scope="session")
def ray_local(request):
    """One local Ray cluster for the session, started the way `raylm` starts one.

    The S3 test server comes up first when it can: Ray's worker processes inherit the
    environment at start-up, and that is how they get its endpoint and credentials (as
    cluster nodes get theirs from their environment or instance role)."""
    import ray

    from raylm.config import Config
    from raylm.pipeline import init_ray

    try:
        weed_binary()
        request.getfixturevalue("s3_server")
    except WeedNotFound:
        pass
    if ray.is_initialized():  # a plain cluster an earlier test left (Ray Train's fit() starts one): not raylm's
        ray.shutdown()
    init_ray(Config(), dashboard=True)  # tests look into the cluster through Ray's state API, which it serves
    yield
    ray.shutdown()



@pytest.fixture
def one_thread():
    """Torch on one thread for the test: OpenMP threads fighting over a busy machine's cores
    make tiny models (and compiled kernels) many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny trained run directory (tests/tiny_run.py), made once per session without Ray:
    what eval, export and serving tests read. Treat it as read-only."""
    from tests.tiny_run import make_tiny_run

    return make_tiny_run(str(tmp_path_factory.mktemp("tiny-run")))


# Fixtures whose tests share this process's one Ray cluster or S3 server.
CLUSTER_FIXTURES = frozenset({"ray_local", "s3_server"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's test command: `-n 2 --dist loadgroup`), every test of a
    module that uses this session's Ray cluster or S3 server (the fixtures above) is in one
    group, which one worker runs in collection order, one test at a time, as a plain `pytest`
    does: one cluster and one S3 server for them all. The other tests run on the other worker
    meanwhile: the unit tests, and integration tests that start clusters of their own (a
    `raylm` process, a `ray start` head), which run beside the session's cluster either way."""
    shared = {item.path for item in items if CLUSTER_FIXTURES & set(item.fixturenames)}
    for item in items:
        if item.path in shared:
            item.add_marker(pytest.mark.xdist_group("cluster"))
