"""``python -m hsam.worker``: a real subprocess speaking the JSON-lines protocol."""

from __future__ import annotations

import subprocess
import sys

import SimpleITK as sitk

from hsam_testlib import ct_like_volume
from hsam import worker_protocol as wp


def run_worker(*args):
    proc = subprocess.run([sys.executable, "-m", "hsam.worker", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    messages = [wp.decode(line) for line in proc.stdout.splitlines()]  # every stdout line is a message
    return proc, messages


def test_segment_success_stream(tmp_path, tiny_model_file):
    src, out = tmp_path / "in.nrrd", tmp_path / "labels.nrrd"
    sitk.WriteImage(ct_like_volume(shape=(5, 24, 28)), str(src))
    proc, messages = run_worker("segment", "--input", src, "--output", out, "--checkpoint", tiny_model_file,
                                "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert isinstance(messages[-1], wp.Result)
    assert messages[-1].labels["name"] == "synapse-8-organs"
    progress = [m for m in messages if isinstance(m, wp.Progress) and m.stage == "segment"]
    done = [m.done for m in progress]
    assert done == sorted(done) and done[-1] == progress[-1].total == 5
    assert any(isinstance(m, wp.Log) for m in messages)
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == (28, 24, 5) and labels.GetPixelID() == sitk.sitkUInt8


def test_input_error_is_a_message_not_a_traceback(tmp_path, tiny_model_file):
    proc, messages = run_worker("segment", "--input", tmp_path / "missing.nrrd", "--output", tmp_path / "o.nrrd",
                                "--checkpoint", tiny_model_file)
    assert proc.returncode == 2
    assert isinstance(messages[-1], wp.Error) and messages[-1].kind == "input"
    assert "does not exist" in messages[-1].message
    assert not (tmp_path / "o.nrrd").exists()


def test_model_error_kind(tmp_path):
    src = tmp_path / "in.nrrd"
    sitk.WriteImage(ct_like_volume(shape=(2, 16, 16)), str(src))
    proc, messages = run_worker("segment", "--input", src, "--output", tmp_path / "o.nrrd",
                                "--checkpoint", tmp_path / "missing.safetensors")
    assert proc.returncode == 2
    assert messages[-1].kind == "model"


def test_protocol_round_trip_and_garbage():
    for message in (wp.Progress(1, 3), wp.Log("hi", "warning"), wp.Result("o", {"name": "x"}), wp.Error("bad")):
        assert wp.decode(wp.encode(message)) == message
    import pytest
    for garbage in ('{"type": "nope"}', "[1, 2]", '{"type": "progress"}'):
        with pytest.raises(ValueError):
            wp.decode(garbage)
