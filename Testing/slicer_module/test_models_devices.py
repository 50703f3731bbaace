"""The panel's model list (from the core registry), "Import weights from file…", and the device list."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hsam.errors import ChecksumError, ModelFileError
from HSAMSegmentLib import devices
from HSAMSegmentLib.devices import GpuInfo, device_choices
from HSAMSegmentLib.models import ModelChoice, import_weights_file, list_model_choices


def test_registry_segmentation_models_are_listed_with_what_first_use_will_do():
    choices, problem = list_model_choices()
    assert problem == ""
    ids = [c.id for c in choices]
    assert "hsam-synapse-10pct" in ids
    assert "sam-vit-b" not in ids and "litemedsam-base" not in ids  # base weights, not segmentation models
    official = choices[ids.index("hsam-synapse-10pct")]
    assert official.source == "registry" and not official.available and official.needs_download
    assert "will be downloaded (at least 358 MB)" in official.note and "Import weights from file" in official.note
    assert official.label.endswith("[unverified]")
    assert official.worker_args() == ["--model", "hsam-synapse-10pct"]


def test_a_broken_registry_gives_a_message_not_a_crash(tmp_path, monkeypatch):
    bad = tmp_path / "site-registry.json"
    bad.write_text("{ not json", encoding="utf-8")
    monkeypatch.setenv("HSAM_REGISTRY", str(bad))
    choices, problem = list_model_choices()
    assert choices == [] and problem.startswith("The model list could not be read: model registry")
    assert "not valid JSON" in problem


def test_importing_our_model_file_adds_it_to_the_list(tiny_model):
    choice, message = import_weights_file(tiny_model)
    assert choice.source == "user" and choice.id == "tiny-organs" and "now in the model list" in message
    assert Path(choice.checkpoint).parent.name == "models" and Path(choice.checkpoint).is_file()
    listed = {c.id: c for c in list_model_choices()[0]}
    assert listed["tiny-organs"].title == "Tiny self-test model (random weights)"
    assert listed["tiny-organs"].worker_args() == ["--model", "tiny-organs"]


def test_a_damaged_model_file_is_refused_readably(tiny_model, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(tiny_model.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="content checksum mismatch"):
        import_weights_file(damaged)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError):
        import_weights_file(garbage)
    assert not any(c.source == "user" for c in list_model_choices()[0])


def test_a_registry_file_with_the_wrong_content_is_refused_and_nothing_is_imported(tmp_path):
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"\0" * 1000)
    with pytest.raises(ChecksumError, match="nothing was imported"):
        import_weights_file(fake)
    from hsam.weights.cache import hsam_home

    assert not (hsam_home() / "downloads" / "sam-vit-b" / "sam_vit_b_01ec64.pth").exists()


def test_an_unknown_checkpoint_is_used_as_given(tmp_path):
    checkpoint = tmp_path / "my_finetune.pth"
    checkpoint.write_bytes(b"weights")
    choice, message = import_weights_file(checkpoint)
    assert choice.source == "file" and choice.worker_args() == ["--checkpoint", str(checkpoint)]
    assert "not a file the model registry knows" in message
    with pytest.raises(ModelFileError, match="no such file"):
        import_weights_file(tmp_path / "missing.pth")
    extra = list_model_choices([choice])[0]
    assert extra[-1] is choice


def test_model_choice_notes():
    assert ModelChoice("a", "A", "registry", available=True).note == "weights present on this computer"
    assert ModelChoice("a", "A", "registry", available=False, download_bytes=2**20 * 375).note.startswith(
        "weights will be downloaded (375 MB)")
    broken = ModelChoice("b", "B", "user", problem="header is damaged")
    assert not broken.usable and broken.label == "B (unusable)" and broken.note == "header is damaged"
    with_sam = ModelChoice("file:x", "x", "file", checkpoint="x.pth", sam_checkpoint="sam.pth")
    assert with_sam.worker_args() == ["--checkpoint", "x.pth", "--sam-checkpoint", "sam.pth"]


# ---------------------------------------------------------------------------------------------- devices

def test_device_list_without_gpu():
    choices = device_choices(gpus=[])
    assert [c.id for c in choices] == ["auto", "cpu"]
    assert choices[0].label == "Automatic (no GPU found: CPU)" and choices[1].label.startswith("CPU (")


def test_device_list_with_gpus():
    gpus = [GpuInfo("cuda", "NVIDIA RTX 4090", 24564), GpuInfo("cuda", "NVIDIA RTX 4090", 24564)]
    choices = device_choices(gpus=gpus)
    assert [c.id for c in choices] == ["auto", "cpu", "cuda"]
    assert choices[0].label == "Automatic (GPU: NVIDIA RTX 4090, 24 GB)"
    assert choices[2].label == "GPU: NVIDIA RTX 4090, 24 GB (+1 more)"
    assert [c.id for c in device_choices(gpus=[GpuInfo("mps", "Apple GPU (Metal)")])] == ["auto", "cpu", "mps"]


def test_gpus_are_found_with_nvidia_smi_without_torch(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA A100-SXM4-80GB, 81920'\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(devices, "_torch_gpus", lambda: None)  # as if torch were not imported
    monkeypatch.setattr(devices.sys, "platform", "linux")
    assert devices.find_gpus() == [GpuInfo("cuda", "NVIDIA A100-SXM4-80GB", 81920)]
    script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n", encoding="utf-8")
    assert devices.find_gpus() == []
