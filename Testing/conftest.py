"""Shared pytest configuration: an isolated per-user cache for every test, markers, the tiny model fixture.
Helper functions live in ``hsam_testlib``."""

from __future__ import annotations

import pytest

from hsam_testlib import make_tiny_model_file


@pytest.fixture(autouse=True)
def _isolated_hsam_home(tmp_path_factory, monkeypatch):
    """Every test gets its own per-user cache, never the developer's real one."""
    monkeypatch.setenv("HSAM_HOME", str(tmp_path_factory.mktemp("hsam_home")))


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    return make_tiny_model_file(tmp_path_factory.mktemp("models") / "tiny.safetensors")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size model tests (seconds to minutes on 2 CPU cores)")
