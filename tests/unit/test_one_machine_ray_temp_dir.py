"""The local Ray cluster that raylm starts keeps its session directory (logs, sockets, spilled
objects) in a directory of the user's only. Ray's default, /tmp/ray, is shared by every user
of the machine, and Ray makes it and each session's logs/ and sockets/ mode 0777 without a
sticky bit: another local user could read every worker's output and delete or replace the
cluster's files and sockets. Likewise torch's compile cache (<tmp>/torchinductor_<user>),
whose code torch runs: another user who made it first could plant code there. And Ray's token
for the cluster (~/.ray/auth_token), which Ray writes with the umask's mode (0644): under a
home directory others may enter, they could read it and join the cluster. These tests
start no cluster: ray.init fails as on an overloaded machine, after raylm has chosen where
the cluster's files go."""

from __future__ import annotations

import os
import stat

import pytest
import ray

from raylm.config import Config
from raylm.pipeline import RayStartError, init_ray

TIMED_OUT = "The current node timed out during startup."


@pytest.fixture
def captured_init(tmp_path, monkeypatch):
    """ray.init replaced by one that records its arguments and fails as a start that timed out;
    a home directory of the test's own (Ray's token goes there)."""
    calls: list[dict] = []
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise Exception(TIMED_OUT)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAYLM_LOCAL_CLUSTER", raising=False)  # init_ray sets it for this process
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # put back as it was after the test: init_ray may set it
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def test_a_local_cluster_gets_a_temp_dir_no_other_user_can_enter(tmp_path, monkeypatch, captured_init):
    shared = tmp_path / "shared-tmp"  # as /tmp: every user may create there
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("RAY_TMPDIR", str(shared))
    with pytest.raises(RayStartError) as raised:
        init_ray(Config())
    temp_dir = captured_init[0].get("_temp_dir")
    assert temp_dir, "Ray's default temp dir, <root>/ray, which Ray makes mode 0777"
    private = os.path.dirname(temp_dir)
    assert os.path.dirname(private) == str(shared)
    # The failed start wrote nothing there: the directory made for it is gone.
    assert not os.path.exists(private)
    assert f"{temp_dir}/session_latest/logs" in str(raised.value)


def test_the_private_directory_is_this_users_alone(tmp_path, monkeypatch, captured_init):
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("RAY_TMPDIR", str(shared))
    monkeypatch.setattr(os, "rmdir", lambda path: None)  # keep it to look at
    with pytest.raises(RayStartError):
        init_ray(Config())
    private = os.path.dirname(captured_init[0]["_temp_dir"])
    st = os.stat(private)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def test_a_root_of_this_users_only_keeps_rays_default(tmp_path, monkeypatch, captured_init):
    """A RAY_TMPDIR no one else can enter (as tests and scripts give) is used as Ray would."""
    own = tmp_path / "own-tmp"
    own.mkdir(mode=0o700)
    own.chmod(0o700)
    monkeypatch.setenv("RAY_TMPDIR", str(own))
    with pytest.raises(RayStartError) as raised:
        init_ray(Config())
    assert captured_init[0].get("_temp_dir") is None
    assert f"{own}/ray/session_latest/logs" in str(raised.value)
    assert not list(own.iterdir())


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch):
    """A temp root every user may write to (as /tmp), for torch's compile cache."""
    import tempfile

    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def compile_cache_seen(monkeypatch) -> list:
    seen: list = []

    def init(*args, **kwargs):
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        raise Exception(TIMED_OUT)

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RayStartError):
        init_ray(Config())
    return seen


def test_a_compile_cache_another_user_can_write_to_is_not_used(shared_tmp, monkeypatch, captured_init):
    """torch.compile keeps compiled Python modules and pickled graphs in
    <tmp>/torchinductor_<user> and runs them at the next compile; a directory of that name made
    first by another user (here: one anyone may write to) let them plant code that ran as this
    user. The cluster's processes and the driver get a cache directory of this user's only."""
    import getpass

    planted = shared_tmp / f"torchinductor_{getpass.getuser()}"
    planted.mkdir()
    planted.chmod(0o777)
    seen = compile_cache_seen(monkeypatch)
    assert seen[0] and seen[0] != str(planted), seen
    st = os.stat(seen[0])
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == seen[0]  # the driver's compiles too


def test_torchs_default_cache_is_made_private_and_kept(shared_tmp, monkeypatch, captured_init):
    """Where the default does not exist yet, raylm makes it, this user's only, and torch goes on
    using it across runs."""
    import getpass

    seen = compile_cache_seen(monkeypatch)
    assert seen == [None]
    st = os.stat(shared_tmp / f"torchinductor_{getpass.getuser()}")
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def test_rays_token_is_made_readable_by_this_user_only(tmp_path, monkeypatch, captured_init):
    """Ray 2.60 makes ~/.ray/auth_token for a local cluster with the umask's mode (0644, in a
    0755 ~/.ray): another user who could enter the home directory read it and could join the
    cluster, running code as this user. raylm makes it first, 0600 in a 0700 ~/.ray."""
    with pytest.raises(RayStartError):
        init_ray(Config())
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_a_token_others_can_read_is_made_this_users_only(tmp_path, monkeypatch, captured_init):
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)
    with pytest.raises(RayStartError):
        init_ray(Config())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64


def test_a_token_the_user_names_is_left_alone(tmp_path, monkeypatch, captured_init):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "named-token"))
    with pytest.raises(RayStartError):
        init_ray(Config())
    assert not (tmp_path / "home" / ".ray").exists()


def test_serve_not_ready_names_the_sessions_own_logs(monkeypatch):
    """A local cluster's session is no longer under Ray's /tmp/ray: "the Ray session's
    logs/serve/" named a place the user could not find. The line names the directory."""
    from raylm.serve import local

    class Node:
        def get_logs_dir_path(self):
            return "/tmp/rayabcdefgh/ray/session_x/logs"

    monkeypatch.setattr(ray._private.worker, "_global_node", Node())
    with pytest.raises(local.ServeNotReady) as raised:
        local.wait_ready(f"http://127.0.0.1:{local.free_port()}", timeout=0)
    assert "the replicas' logs are in /tmp/rayabcdefgh/ray/session_x/logs/serve/" in str(raised.value)
