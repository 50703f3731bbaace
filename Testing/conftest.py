"""Shared pytest configuration: fixture locations, tiny model configurations, markers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_REFERENCE = SHARED / "fixtures" / "hsam_reference" / "reference_outputs.npz"


def reference_fixture_path() -> Path:
    """The official-equivalence fixture (``HSAM_REFERENCE_FIXTURE`` overrides the default)."""
    return Path(os.environ.get("HSAM_REFERENCE_FIXTURE", DEFAULT_REFERENCE))


@pytest.fixture(autouse=True)
def _isolated_hsam_home(tmp_path_factory, monkeypatch):
    """Every test gets its own per-user cache, never the developer's real one."""
    monkeypatch.setenv("HSAM_HOME", str(tmp_path_factory.mktemp("hsam_home")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size model tests (seconds to minutes on 2 CPU cores)")
