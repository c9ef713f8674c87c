"""Fixtures the integration tests of several modules share, made once a session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tune_data(ray_local, tmp_path_factory):
    """The data the Tune tests' trials train on (tests.tune_search.prepare_tune_data)."""
    from tests.tune_search import prepare_tune_data

    return prepare_tune_data(tmp_path_factory.mktemp("tune-data"))


@pytest.fixture(scope="session")
def finished_search(tune_data, tmp_path_factory):
    """One finished 2-trial search (local storage): (config, summary). Tests copy it before
    they change or resume it: it is every Tune module's."""
    from tests.tune_search import run_finished_search

    return run_finished_search(tune_data, tmp_path_factory.mktemp("tune-finished"))
