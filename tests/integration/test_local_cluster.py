"""The local cluster a run starts: Ray's dashboard only where asked for, Ray Data in the
driver and the quickstart's one-request serving step without their INFO chatter. One
subprocess starts both clusters (a fresh process: the session's cluster has a dashboard, and
Serve already running)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import os, sys, ray
from raylm.config import Config
from raylm.pipeline import init_ray
from raylm.serve.local import serve_and_chat
for asked in ("", "1"):
    os.environ["RAYLM_DASHBOARD"] = asked
    init_ray(Config())
    print(f"asked={asked!r} url={ray.init(ignore_reinit_error=True).dashboard_url!r}", flush=True)
    if not asked:  # Ray Data in the driver, as SFT and DPO preparation run it, then the quickstart's last step
        print("ROWS", len(ray.data.range(8).map_batches(lambda b: b, batch_size=2).take_all()), flush=True)
        print("ANSWER", serve_and_chat(sys.argv[1], "reverse: abc", max_tokens=8)["answer"], flush=True)
    ray.shutdown()
"""


@pytest.fixture(scope="module")
def clusters(tiny_run):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYLM_DASHBOARD")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, tiny_run], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_local_cluster_has_a_dashboard_only_where_asked_for(clusters):
    """Off by default (ten processes and 2 s of start-up on a small machine); RAYLM_DASHBOARD=1
    starts it on loopback and logs where it is."""
    lines = clusters.stdout.splitlines()
    off = [x for x in lines if x.startswith("asked=''")]
    on = [x for x in lines if x.startswith("asked='1'")]
    assert off and on, clusters.stdout
    assert off[0] in ("asked='' url=''", "asked='' url=None"), off[0]
    url = on[0].split("url=")[1].strip("'")
    assert url.startswith("127.0.0.1:"), on[0]
    assert f"Ray dashboard: http://{url}" in clusters.stdout
    assert clusters.stdout.count("Ray dashboard:") == 1  # logged for the cluster that has one only


def test_ray_data_in_the_driver_prints_no_info_lines(clusters):
    """A dataset that the driver runs itself (SFT and DPO records, a large corpus) logs its
    progress to Ray's log files, not the console: no "execution finished" or "Tip:" lines
    between raylm's own (`raylm.pipeline.quiet_ray_data`, after the import that makes Ray Data's
console handler)."""
    assert "ROWS 8" in clusters.stdout
    data = [x for x in (clusters.stdout + clusters.stderr).splitlines()
            if "streaming_executor" in x or "dataset.py" in x or "execution finished" in x]
    assert not data, data[:5]


def test_the_quickstart_serving_step_prints_its_answer_without_serves_info_lines(clusters):
    """`raylm quickstart` ends by serving one chat request (`serve_and_chat`) on a fresh Serve:
    its controller, ingress and replica log at ERROR there, and the driver's Serve logger at WARNING,
    so the answer is not buried under start-up and access lines (`raylm serve` keeps them)."""
    assert "ANSWER" in clusters.stdout
    chatter = [x for x in (clusters.stdout + clusters.stderr).splitlines() if " INFO " in x]
    assert not chatter, chatter[:5]
    # Nor a warning the user cannot act on: behind HAProxy, Serve's controller warns that a
    # loopback host refuses connections from other nodes, which a local cluster does not have.
    warned = [x for x in (clusters.stdout + clusters.stderr).splitlines() if " WARNING " in x]
    assert not warned, warned[:5]
    # Nor Ray's retry warning about Serve's controller killing itself mid-graceful_shutdown,
    # which a serve.shutdown() on this cluster, about to go down anyway, would print.
    raylet = [x for x in (clusters.stdout + clusters.stderr).splitlines() if "(raylet)" in x]
    assert not raylet, raylet[:5]
