"""The module's Slicer self-test checks, run here headless with the fake worker (in Slicer, HSAMSegmentTest runs
them with the real worker and a tiny model)."""

from __future__ import annotations

import unittest

import pytest
from hsamsegment_testlib import fake_launcher

slicer = pytest.importorskip("slicer")


class Case(unittest.TestCase):
    """Only its assertions are used (as HSAMSegmentTest's are in Slicer)."""

    __test__ = False

    def runTest(self):  # pragma: no cover - only used for its assertions
        pass

    def delayDisplay(self, message):
        self.messages = getattr(self, "messages", []) + [message]


def test_self_test_checks_pass_with_the_fake_worker(scene, fake_model):
    import HSAMSegment
    from HSAMSegmentLib import selftest

    case = Case()
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", FAKE_BONE_HU=300))
    selftest.check_bad_inputs(case, logic, scene)
    selftest.check_segment_and_cancel(case, logic, scene, fake_model, timeout=60)
    assert case.messages[-1] == "Self-test passed"


def test_self_test_volume_is_ct_like(scene):
    import numpy as np

    from HSAMSegmentLib import scene_io, selftest

    volume = selftest.add_ct_like_volume(scene)
    array = np.array(scene_io.volume_array(volume))
    assert array.dtype == np.int16 and array.shape == (12, 36, 40)
    assert array.min() <= -900 and array.max() >= 600  # air and bone
    scene_io.check_input_volume(volume)
