"""`raylm serve --detach` without a cluster to join (RAY_ADDRESS) is refused before Ray
starts: the local cluster it would start ends with the command, and the app with it, while
the command said the app was left serving."""

from __future__ import annotations

import pytest

import raylm.pipeline
from raylm.cli import main


def test_detach_without_a_cluster_to_join_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(raylm.pipeline, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    assert main(["serve", str(tmp_path / "run"), "--detach", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "--detach" in err and "RAY_ADDRESS" in err and len(err.strip().splitlines()) == 1
