"""serve.device names what a replica runs on: cpu, or cuda for a GPU replica (it holds one).
Any other value (`device=gpu`) passed the config and failed in every replica's constructor once
Ray and Serve had started, as a traceback of Serve's deployment error reported as a bug in raylm."""

from __future__ import annotations

import pytest

from raylm.cli import main
from raylm.config import ConfigError, load_serve_config


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:1", "CPU", ""])
def test_an_unknown_serve_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match=r"serve\.device="):
        load_serve_config([f"device={device}"])


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0"])
def test_the_serve_devices_load(device):
    assert load_serve_config([f"serve.device={device}"]).device == device


def test_raylm_serve_refuses_it_before_ray_starts(monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("raylm.pipeline.init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "runs/x", "device=gpu", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "raylm: error: serve.device='gpu': expected cpu, or cuda for a GPU replica", err
