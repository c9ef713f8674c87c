"""`raylm serve` names a missing run before Ray starts: with no run at all (the override taken
for it) or a path with no checkpoint, it started Ray and Serve's proxy first (about 10 s) and
only then said so."""

import pytest

from raylm.cli import main


@pytest.fixture
def no_ray_started(monkeypatch):
    """Starting Ray fails the test: the command must be refused before it."""
    import raylm.pipeline

    def init_ray(*_, **__):
        raise AssertionError("Ray was started for a command refused before it")

    monkeypatch.setattr(raylm.pipeline, "init_ray", init_ray)


def test_an_override_for_a_run_is_named_so(capsys, no_ray_started):
    assert main(["serve", "max_batch_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "raylm: error: serve: no run given ('max_batch_size=32' is a KEY=VALUE override); " \
                  "usage: raylm serve RUN [KEY=VALUE ...]", err


def test_a_run_with_no_checkpoint_is_named_before_ray(tmp_path, capsys, monkeypatch, no_ray_started):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: ") and str(tmp_path / "nope") in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv, named", [
    (["--host", "0.0.0.0"], "serve.host=0.0.0.0: serving beyond loopback needs an API key"),
    (["--engine", "vllm", "--api-key", "k"], "serve.api_key: the vLLM app's ingress cannot check"),
    (["--engine", "vllm", "--host", "0.0.0.0"], "serve.host=0.0.0.0: the vLLM app has no API key"),
])
def test_access_settings_are_refused_before_ray(tiny_run, capsys, monkeypatch, no_ray_started, argv, named):
    """A host beyond loopback without a key, and the vLLM app given a key it would ignore or a
    host beyond loopback, were refused only once Ray (and for the raylm engine, Serve's
    proxy) had started."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    assert main(["serve", tiny_run, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: " + named) and len(err.splitlines()) == 1, err
