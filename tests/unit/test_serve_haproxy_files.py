"""Where a local cluster's HAProxy keeps its config and sockets (raylm.pipeline.serve_ingress_env).

Ray Serve's defaults put them under /tmp/haproxy-serve/<node>/, a directory any local user can
enter, and the admin socket there is mode 666 at `level admin`: another user on the machine
connected to it, moved the replica's backend to a port of their own (`set server ... addr`) and
received the next request whole, `Authorization: Bearer <key>` included."""

import os
import stat

import pytest

from raylm.pipeline import serve_ingress_env

CONFIG, SOCKET, STATE_BASE, STATE_FILE, METRICS = (
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH")
KEYS = (CONFIG, SOCKET, STATE_BASE, STATE_FILE, METRICS)
NODE_ID = "0" * 56  # Ray puts a directory named after the node beneath each path's directory


def _env(monkeypatch) -> dict:
    env = serve_ingress_env()
    if not env:
        pytest.skip("no HAProxy binary here: Serve's Python proxy has no admin socket")
    return env


def test_haproxy_admin_socket_and_config_lie_in_a_directory_only_this_user_enters(monkeypatch):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    env = _env(monkeypatch)
    missing = [k for k in KEYS if not env.get(k)]
    assert not missing, f"left at Ray's shared /tmp/haproxy-serve: {missing}"
    for k in KEYS:
        where = env[k] if k == STATE_BASE else os.path.dirname(env[k])
        st = os.stat(where)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0, (k, where, oct(st.st_mode))
    for k in (SOCKET, METRICS):  # a Unix socket's path: at most 107 bytes, with the node's directory
        head, name = os.path.split(env[k])
        assert len(os.path.join(head, NODE_ID, name).encode()) <= 107, env[k]


def test_a_users_own_haproxy_paths_are_kept(monkeypatch, tmp_path):
    mine = {k: str(tmp_path / k.lower()) for k in KEYS}
    for k, v in mine.items():
        monkeypatch.setenv(k, v)
    env = _env(monkeypatch)
    assert all(env.get(k, v) == v for k, v in mine.items()), env
