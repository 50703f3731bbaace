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


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (stable timings/results on the shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    """The tiny model file, loaded (one per test module)."""
    from hsam.weights.loader import load_model

    return load_model(checkpoint=tiny_model_file)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size model tests (seconds to minutes on 2 CPU cores)")
