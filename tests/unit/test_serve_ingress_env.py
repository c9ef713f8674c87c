"""The settings a local cluster's Serve ingress starts with (raylm.pipeline.serve_ingress_env)."""

import socket

import pytest

from raylm.pipeline import serve_ingress_env

PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
         "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def test_haproxy_listeners_get_free_ports_so_two_clusters_can_serve_on_one_machine(monkeypatch):
    """Ray's fixed defaults (8404 and 9101 on every interface) made a second cluster's HAProxy
    exit at start-up while another served, and both clusters' fallback proxies listened on
    8500 (and 9500 for gRPC) with SO_REUSEPORT, each getting the other's requests; each
    cluster now gets ports of its own, and a user's own setting is kept."""
    for k in PORTS:
        monkeypatch.delenv(k, raising=False)
    env = serve_ingress_env()
    if not env:
        pytest.skip("no HAProxy binary here: Serve's Python proxy has no such listeners")
    ports = [int(env[k]) for k in PORTS]
    assert len(set(ports)) == 4 and not {8404, 9101, 8500, 9500} & set(ports), ports
    for port in ports:  # free now (the cluster binds them next)
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert serve_ingress_env()["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
