"""The module with the REAL worker (``python -m hsam.worker``) and a tiny random-weight model: the same checks
the Slicer self-test runs (about 5 s on 2 CPU cores). Switching from the fake worker is the launcher:
``real_launcher()`` instead of ``fake_launcher(...)``."""

from __future__ import annotations

import unittest

import pytest
from hsamsegment_testlib import make_volume, real_launcher

slicer = pytest.importorskip("slicer")

from HSAMSegmentLib.errors import WorkerFailed  # noqa: E402
from HSAMSegmentLib.models import ModelChoice  # noqa: E402
from HSAMSegmentLib.selftest import scene_state  # noqa: E402


class Case(unittest.TestCase):
    """Only its assertions are used (as HSAMSegmentTest's are in Slicer)."""

    __test__ = False

    def runTest(self):  # pragma: no cover
        pass

    def delayDisplay(self, message):
        pass


def test_real_worker_reports_a_missing_model_file_readably(scene, tmp_path):
    import HSAMSegment

    logic = HSAMSegment.HSAMSegmentLogic(launcher=real_launcher())
    volume = make_volume(scene)
    before = scene_state(scene, volume)
    missing = tmp_path / "nowhere.safetensors"
    model = ModelChoice("file:" + str(missing), "missing", "file", checkpoint=str(missing))
    with pytest.raises(WorkerFailed) as raised:
        logic.segment(volume, model, device="cpu", wait=True, timeout=120)
    assert raised.value.kind in ("model", "input") and "nowhere.safetensors" in str(raised.value)
    assert "Traceback" not in str(raised.value)
    assert scene_state(scene, volume) == before


def test_real_worker_end_to_end_with_a_tiny_model(scene, tiny_model):
    import HSAMSegment
    from HSAMSegmentLib import selftest

    logic = HSAMSegment.HSAMSegmentLogic(launcher=real_launcher())
    model = ModelChoice("file:" + str(tiny_model), "tiny", "file", checkpoint=str(tiny_model))
    selftest.check_segment_and_cancel(Case(), logic, scene, model, timeout=300)
