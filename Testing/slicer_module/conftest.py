"""Fixtures of the HSAMSegment module tests (helpers: ``hsamsegment_testlib``)."""

from __future__ import annotations

import tempfile

import pytest
from hsamsegment_testlib import new_scene, release_scene


@pytest.fixture
def scene(tmp_path_factory):
    """``new_scene``, also set as ``slicer.mrmlScene`` while the test runs."""
    slicer = pytest.importorskip("slicer")
    scene = new_scene(tmp_path_factory.mktemp("slicer"))
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    slicer.mrmlScene = previous
    release_scene(scene)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny randomly initialised H-SAM model file (our format, Synapse label set), written once per session."""
    pytest.importorskip("torch")
    from HSAMSegmentLib.selftest import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-organs.safetensors")


@pytest.fixture
def fake_model():
    from HSAMSegmentLib.models import ModelChoice

    return ModelChoice(id="fake-model", title="Fake model", source="registry", available=True)


@pytest.fixture(autouse=True)
def _private_tmp(tmp_path, monkeypatch):
    """Temporary files of the module go under the test's tmp_path (and are checked to be cleaned up)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
