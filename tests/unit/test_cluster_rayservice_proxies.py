"""cluster/kuberay/rayservice-serve.yaml: every worker pod of the RayService can become Ready.

KubeRay gives the worker pods of a RayService (those without a readiness probe of their own) a
readiness probe that asks the Serve proxy on the pod's serve port for `/-/healthz`, so that the
Kubernetes serve service sends requests only to pods with a live proxy. With
`proxy_location: HeadOnly` no worker pod ever runs a proxy: every GPU pod stayed NotReady for
as long as the service ran ("Readiness probe failed" events every few seconds, the RayCluster
never counted as ready, `kubectl wait --for=condition=Ready` never returning), and all traffic
went through the one proxy on the head's few CPUs. A readiness probe of one's own (Ray's health
alone) is no way out either: the pods then turn Ready without a proxy and get traffic they
cannot answer.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RAYSERVICES = [p for p in sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
               if any((d or {}).get("kind") == "RayService" for d in yaml.safe_load_all(p.read_text()))]


def test_there_is_a_rayservice():
    assert RAYSERVICES, "cluster/kuberay/ has no RayService manifest"


def test_rayservice_worker_pods_run_a_serve_proxy():
    """Worker pods that hold replicas run a proxy (EveryNode, Serve's default), so KubeRay's
    readiness probe on them passes, and none of them replaces that probe."""
    for path in RAYSERVICES:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "RayService":
                continue
            serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
            location = serve.get("proxy_location", "EveryNode")
            workers = doc["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
            if not workers:
                continue
            assert location == "EveryNode", (
                f"{path.name}: proxy_location: {location} leaves the worker pods without a Serve proxy, and KubeRay's "
                f"readiness probe on them (GET /-/healthz on the serve port) never passes: use EveryNode")
            for group in workers:
                for c in group["template"]["spec"]["containers"][:1]:
                    assert "readinessProbe" not in c, (
                        f"{path.name}: group {group['groupName']} replaces KubeRay's readiness probe, which keeps "
                        f"pods without a live Serve proxy out of the serve service")
