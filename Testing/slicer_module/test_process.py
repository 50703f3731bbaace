"""The worker protocol over a real subprocess (the fake worker): messages, errors, crashes, garbage, and cancel
killing the whole process tree."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from hsamsegment_testlib import FAKE_WORKER, fake_launcher

from hsam import worker_protocol as wp
from HSAMSegmentLib.corepath import bundled_core_dir
from HSAMSegmentLib.process import (Exited, StderrLine, StdoutGarbage, SubprocessWorker, WorkerLauncher,
                                    WorkerProcess, decode_line)


def collect(process, timeout=30.0, until=Exited):
    """Poll until an event of type ``until`` arrives; return all events."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = process.poll()
        events += new
        if any(isinstance(e, until) for e in new):
            return events
        time.sleep(0.02)
    raise AssertionError(f"no {until.__name__} within {timeout} s; got {events}")


@pytest.fixture
def input_nrrd(tmp_path):
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.5, 0.7, 2.0))
    path = tmp_path / "in.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def start(mode, input_nrrd, tmp_path, **env):
    launcher = fake_launcher(mode, **env)
    return launcher.launch(["segment", "--input", str(input_nrrd), "--output", str(tmp_path / "out.nrrd"),
                            "--model", "m", "--device", "cpu"])


def test_success_messages_arrive_in_order_and_exit_comes_last(input_nrrd, tmp_path):
    process = start("ok", input_nrrd, tmp_path)
    assert isinstance(process, WorkerProcess)
    events = collect(process)
    kinds = [type(e).__name__ for e in events if not isinstance(e, StderrLine)]
    assert kinds[0] == "Progress" and kinds[-2:] == ["Result", "Exited"]
    progress = [e for e in events if isinstance(e, wp.Progress) and e.stage == "segment"]
    assert [p.done for p in progress] == list(range(5)) and {p.total for p in progress} == {4}
    result = next(e for e in events if isinstance(e, wp.Result))
    assert result.labels["name"] == "synapse-8-organs" and os.path.isfile(result.output)
    assert events[-1] == Exited(0)
    assert process.poll() == []  # nothing after Exited


def test_error_message_and_exit_status(input_nrrd, tmp_path):
    events = collect(start("error", input_nrrd, tmp_path))
    error = next(e for e in events if isinstance(e, wp.Error))
    assert error.kind == "model" and "checksum mismatch" in error.message
    assert events[-1] == Exited(2)


def test_crash_without_error_message(input_nrrd, tmp_path):
    events = collect(start("crash", input_nrrd, tmp_path))
    assert not any(isinstance(e, wp.Error) for e in events)
    assert any(isinstance(e, StderrLine) and "illegal memory access" in e.text for e in events)
    assert events[-1] == Exited(3)


def test_garbage_on_stdout_is_reported_not_swallowed(input_nrrd, tmp_path):
    events = collect(start("garbage", input_nrrd, tmp_path))
    garbage = [e for e in events if isinstance(e, StdoutGarbage)]
    assert garbage and garbage[0].text == "Downloading weights... 100%"
    assert events[-1] == Exited(1)


def test_cancel_mid_run_kills_the_whole_process_tree(input_nrrd, tmp_path):
    pidfile = tmp_path / "pids"
    process = start("hang", input_nrrd, tmp_path, FAKE_PIDFILE=pidfile)
    events = collect(process, until=wp.Progress)
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    worker_pid, child_pid = (int(p) for p in pidfile.read_text().split())
    assert worker_pid == process.pid
    assert psutil.Process(child_pid).is_running()
    started = time.monotonic()
    process.kill()
    events = collect(process, timeout=10)
    assert time.monotonic() - started < 5
    assert events[-1].returncode != 0
    for pid in (worker_pid, child_pid):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {pid} survived the cancel")
    process.kill()  # idempotent


def test_a_missing_interpreter_fails_to_start_readably(tmp_path):
    launcher = WorkerLauncher(python=str(tmp_path / "no-such-python"))
    with pytest.raises(OSError):
        launcher.launch(["segment"])


def test_launcher_command_and_environment():
    real = WorkerLauncher(python="/opt/Slicer/bin/PythonSlicer")
    assert real.command(["segment", "--input", "a"]) == ["/opt/Slicer/bin/PythonSlicer", "-m", "hsam.worker",
                                                        "segment", "--input", "a"]
    fake = WorkerLauncher(python=sys.executable, script=str(FAKE_WORKER))
    assert fake.command(["x"]) == [sys.executable, str(FAKE_WORKER), "x"]
    env = real.environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(bundled_core_dir())
    assert env["PYTHONUNBUFFERED"] == "1"
    assert (bundled_core_dir() / "hsam" / "worker_protocol.py").is_file()


def test_decode_line():
    assert decode_line('{"type":"progress","done":1,"total":2,"stage":"segment"}') == wp.Progress(1, 2, "segment")
    garbage = decode_line("100%|██████████| 3/3")
    assert isinstance(garbage, StdoutGarbage) and garbage.reason
    assert isinstance(decode_line('{"type":"progress","done":1}'), StdoutGarbage)  # malformed message
    assert isinstance(decode_line('{"type":"nonsense"}'), StdoutGarbage)


def test_subprocess_worker_poll_never_blocks(tmp_path):
    process = SubprocessWorker([sys.executable, "-c", "import time; time.sleep(30)"])
    process.start()
    try:
        started = time.monotonic()
        for _ in range(50):
            assert process.poll() == []
        assert time.monotonic() - started < 0.5
    finally:
        process.kill()
    assert collect(process, timeout=10)[-1].returncode != 0
