"""The segment job and the module's Logic: success, cancel, failing workers, downloads, pre-flight checks —
a failed or cancelled run leaves the scene exactly as before and says why in words."""

from __future__ import annotations

import os
import tempfile
import time
from types import SimpleNamespace

import psutil
import pytest
from hsamsegment_testlib import fake_launcher, make_volume

slicer = pytest.importorskip("slicer")

from hsam.errors import ChecksumError  # noqa: E402
from HSAMSegmentLib import scene_io  # noqa: E402
from HSAMSegmentLib.errors import SegmentInputError, WorkerFailed  # noqa: E402
from HSAMSegmentLib.models import ModelChoice  # noqa: E402
from HSAMSegmentLib.run import (JobState, ProgressEstimator, ProgressInfo, SegmentJob, SegmentRequest,  # noqa: E402
                                describe_exit, format_duration)
from HSAMSegmentLib.selftest import scene_state  # noqa: E402


def temp_left():
    return os.listdir(tempfile.gettempdir())


def poll_until(job, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.poll()
        if condition(job):
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not reached; state {job.state}, log {job.log_lines}")


def gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------- the Logic

def test_module_logic_segments_with_wait(scene, fake_model):
    import HSAMSegment

    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok"))  # the real worker: launcher omitted
    volume = make_volume(scene)
    job = logic.segment(volume, fake_model, wait=True, timeout=60)
    assert job.state is JobState.SUCCEEDED
    assert job.result_node.GetScene() is scene
    assert job.result_node.GetName() == "CT H-SAM segmentation"
    assert any("fake warning" in message for _, message in job.log_lines)
    assert temp_left() == []


def test_module_logic_raises_readable_errors_with_wait(scene, fake_model):
    import HSAMSegment

    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("error"))
    volume = make_volume(scene)
    before = scene_state(scene, volume)
    with pytest.raises(WorkerFailed, match="Checksum mismatch for 220_epoch_299.pth") as info:
        logic.segment(volume, fake_model, wait=True, timeout=60)
    assert info.value.kind == "model"
    assert scene_state(scene, volume) == before
    with pytest.raises(SegmentInputError, match="unknown model 'no-such-model'"):
        logic.segment(volume, "no-such-model")


def test_module_logic_refuses_a_second_run_while_one_runs(scene, fake_model):
    import HSAMSegment

    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", FAKE_DELAY=0.2))
    volume = make_volume(scene)
    job = logic.segment(volume, fake_model)
    with pytest.raises(SegmentInputError, match="already running"):
        logic.segment(volume, fake_model)
    logic.cancel()
    assert job.state is JobState.CANCELLED


def test_module_metadata_cites_hsam_and_sam():
    import HSAMSegment

    parent = SimpleNamespace()
    HSAMSegment.HSAMSegment(parent)
    assert parent.categories == ["Segmentation"]
    assert "Segment organs" in parent.helpText
    assert "Cheng" in parent.acknowledgementText and "CVPR 2024" in parent.acknowledgementText
    assert "Kirillov" in parent.acknowledgementText and "Segment Anything" in parent.acknowledgementText


# ---------------------------------------------------------------------------------------------- cancel

def test_cancel_mid_run_leaves_the_scene_unchanged_and_kills_the_tree(scene, fake_model, tmp_path):
    volume = make_volume(scene)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Existing")
    existing.GetSegmentation().AddEmptySegment("kept", "kept")
    before = scene_state(scene, volume)
    pidfile = tmp_path / "pids"
    job = SegmentJob(scene, SegmentRequest(volume, fake_model, existing),
                     fake_launcher("hang", FAKE_PIDFILE=pidfile), undo=scene_io.UndoStore())
    job.start()
    poll_until(job, lambda j: j.progress.stage == "segment" and pidfile.exists() and pidfile.read_text().strip())
    worker_pid, child_pid = (int(p) for p in pidfile.read_text().split())
    job.cancel()
    assert job.state is JobState.CANCELLED and not job.poll()
    assert gone(worker_pid) and gone(child_pid)
    assert scene_state(scene, volume) == before
    assert temp_left() == []
    assert job.log_lines[-1] == ("info", "Cancelled; the scene was not changed.")


def test_a_cancelled_run_never_imports_even_if_the_worker_had_finished(scene, fake_model):
    volume = make_volume(scene)
    before = scene_state(scene, volume)
    job = SegmentJob(scene, SegmentRequest(volume, fake_model), fake_launcher("ok", FAKE_DELAY=0.05)).start()
    poll_until(job, lambda j: j.progress.stage == "segment")
    job.cancel()
    time.sleep(1.0)
    assert not job.poll()
    assert job.result_node is None and scene_state(scene, volume) == before


def test_wait_with_timeout_cancels_and_says_so(scene, fake_model, tmp_path):
    volume = make_volume(scene)
    before = scene_state(scene, volume)
    job = SegmentJob(scene, SegmentRequest(volume, fake_model),
                     fake_launcher("hang", FAKE_PIDFILE=tmp_path / "pids")).start()
    with pytest.raises(WorkerFailed, match="did not finish within 2 s and was cancelled"):
        job.wait(timeout=2)
    assert job.state is JobState.CANCELLED and scene_state(scene, volume) == before


# ---------------------------------------------------------------------------------------------- failures

@pytest.mark.parametrize("mode, expected", [
    ("error", "Checksum mismatch for 220_epoch_299.pth: the file is damaged"),
    ("crash", "The segmentation worker stopped with exit code 3 without reporting an error; its last message "
              "was: RuntimeError: CUDA error: an illegal memory access was encountered"),
    ("garbage", "it printed 1 line(s) that are not protocol messages, e.g. 'Downloading weights... 100%'"),
    ("noresult", "The segmentation worker ended without sending a result"),
])
def test_a_failing_worker_leaves_the_scene_unchanged_and_explains(scene, fake_model, mode, expected):
    volume = make_volume(scene)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Existing")
    existing.GetSegmentation().AddEmptySegment("kept", "kept")
    for output in (None, existing):
        before = scene_state(scene, volume)
        seen = []
        job = SegmentJob(scene, SegmentRequest(volume, fake_model, output), fake_launcher(mode),
                         listener=lambda j, what, seen=seen: seen.append(what)).start()
        job.wait(60)
        assert job.state is JobState.FAILED
        assert expected in job.error_message, job.error_message
        assert "Traceback" not in job.error_message and 'File "' not in job.error_message
        assert job.log_lines[-1] == ("error", job.error_message)
        assert scene_state(scene, volume) == before
        assert seen[-1] == "state" and "progress" in seen and "log" in seen
        assert temp_left() == []


def test_input_removed_during_the_run(scene, fake_model):
    volume = make_volume(scene)
    job = SegmentJob(scene, SegmentRequest(volume, fake_model), fake_launcher("ok", FAKE_DELAY=0.05)).start()
    scene.RemoveNode(volume)
    count = scene.GetNumberOfNodes()
    job.wait(60)
    assert job.state is JobState.FAILED and "removed from the scene during the run" in job.error_message
    assert scene.GetNumberOfNodes() == count


def test_pre_flight_errors_raise_before_anything_happens(scene, fake_model):
    volume = make_volume(scene)
    before = scene_state(scene, volume)
    bad = [
        (SegmentRequest(volume, fake_model, device="tpu"), "unknown device 'tpu'"),
        (SegmentRequest(volume, ModelChoice("x", "X", "user", problem="header is damaged")), "header is damaged"),
        (SegmentRequest(None, fake_model), "Select an input volume"),
        (SegmentRequest(volume, fake_model, batch_size=0), "batch size"),
        (SegmentRequest(volume, None), "Select a model"),
    ]
    for request, message in bad:
        with pytest.raises(SegmentInputError, match=message):
            SegmentJob(scene, request, fake_launcher("ok")).start()
    assert scene_state(scene, volume) == before and temp_left() == []


def test_worker_that_cannot_start(scene, fake_model, tmp_path):
    from HSAMSegmentLib.process import WorkerLauncher

    volume = make_volume(scene)
    job = SegmentJob(scene, SegmentRequest(volume, fake_model), WorkerLauncher(python=str(tmp_path / "nope")))
    with pytest.raises(WorkerFailed, match="could not be started"):
        job.start()
    assert temp_left() == []


# ---------------------------------------------------------------------------------------------- download

def test_missing_weights_are_downloaded_first_with_progress(scene):
    volume = make_volume(scene)
    calls = []

    def fetch(choice, progress):
        calls.append(choice.id)
        for done in (0, 100, 200):
            progress("weights.pth", done * 2**20, 200 * 2**20)

    model = ModelChoice("reg-model", "Registry model", "registry", available=False)
    assert model.needs_download
    infos = []
    job = SegmentJob(scene, SegmentRequest(volume, model), fake_launcher("ok"), fetch=fetch,
                     listener=lambda j, what: infos.append(j.progress) if what == "progress" else None).start()
    assert job.state is JobState.DOWNLOADING
    job.wait(60)
    assert job.state is JobState.SUCCEEDED and calls == ["reg-model"]
    downloads = [i for i in infos if i.stage == "download" and i.total]
    assert downloads[-1].text.startswith("Downloading weights: 200 of 200 MB")


def test_a_failed_download_explains_and_changes_nothing(scene):
    volume = make_volume(scene)
    before = scene_state(scene, volume)

    def fetch(choice, progress):
        raise ChecksumError("checksum mismatch for sam_vit_b_01ec64.pth: the file is damaged, delete it")

    job = SegmentJob(scene, SegmentRequest(volume, ModelChoice("m", "M", "registry", available=False)),
                     fake_launcher("ok"), fetch=fetch).start()
    job.wait(30)
    assert job.state is JobState.FAILED
    assert job.error_message.startswith("The weights could not be downloaded: checksum mismatch")
    assert scene_state(scene, volume) == before and temp_left() == []


def test_cancel_during_download_stops_it(scene):
    volume = make_volume(scene)
    stopped = []

    def fetch(choice, progress):
        try:
            while True:
                progress("w.pth", 1, 10)
                time.sleep(0.01)
        except Exception as exc:  # the job's progress callback raises CancelledError after cancel()
            stopped.append(type(exc).__name__)
            raise

    job = SegmentJob(scene, SegmentRequest(volume, ModelChoice("m", "M", "registry", available=False)),
                     fake_launcher("ok"), fetch=fetch).start()
    poll_until(job, lambda j: j.progress.total == 10)
    job.cancel()
    deadline = time.monotonic() + 5
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped == ["CancelledError"] and job.process is None and job.state is JobState.CANCELLED


# ---------------------------------------------------------------------------------------------- progress

def test_time_left_estimate():
    now = [0.0]
    estimator = ProgressEstimator(clock=lambda: now[0])
    assert estimator.update("segment", 0, 100) is None
    now[0] = 0.5
    assert estimator.update("segment", 5, 100) is None  # under a second: no estimate yet
    now[0] = 2.0
    assert estimator.update("segment", 20, 100) == pytest.approx(8.0)
    now[0] = 3.0
    assert estimator.update("write", 0, 1) is None  # a new stage starts over


def test_progress_from_worker_messages(scene, fake_model):
    volume = make_volume(scene)
    texts = []
    job = SegmentJob(scene, SegmentRequest(volume, fake_model), fake_launcher("ok"),
                     listener=lambda j, what: texts.append(j.progress.text) if what == "progress" else None)
    job.start().wait(60)
    assert "Loading the model…" in texts  # Progress(0, 1, "load") is shown as busy, not as "0 of 1"
    assert "Segmenting: 10 of 10 slices" in [t.split(",")[0] for t in texts]
    assert texts[-1] == "Creating the segmentation…"


def test_progress_text():
    assert ProgressInfo("segment", 40, 140, 80).text == "Segmenting: 40 of 140 slices, about 1 min 20 s left"
    assert ProgressInfo("load").text == "Loading the model…"
    assert ProgressInfo("download", 2**20 * 5, 2**20 * 375, unit="bytes").text == \
        "Downloading weights: 5 of 375 MB"
    assert ProgressInfo("segment", 3, 4).fraction == 0.75 and ProgressInfo("load").fraction is None
    assert format_duration(3700) == "about 1 h 01 min" and format_duration(0.2) == "about 1 s"


def test_describe_exit():
    assert "ran out of memory" in describe_exit(-9)
    assert "segmentation fault" in describe_exit(-11)
    assert describe_exit(1) == "stopped with exit code 1 without reporting an error"
