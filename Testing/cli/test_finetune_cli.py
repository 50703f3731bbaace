"""``hsam finetune``, ``python -m hsam.worker finetune`` and ``hsam demo --quick`` end to end."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam_testlib import make_tiny_model_file
from hsam import worker_protocol as wp
from hsam.cli import main
from hsam.weights.modelfile import read_description

FAST = ["--device", "cpu", "--precision", "fp32", "--quiet"]


def run(*argv):
    return main([str(a) for a in argv])


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blob_files(tmp_path, depth=6, size=32):
    """A small CT-like volume with two labelled blobs, as NRRD files (image, labels)."""
    zz, yy, xx = np.meshgrid(np.arange(depth), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    a = ((xx + 0.35) / 0.3) ** 2 + (yy / 0.3) ** 2 < 1
    b = ((xx - 0.4) / 0.2) ** 2 + ((yy + 0.1) / 0.2) ** 2 < 1
    volume = np.where((xx / 0.95) ** 2 + (yy / 0.8) ** 2 < 1, 20.0, -1000.0)
    volume[a], volume[b] = 90.0, 260.0
    labels = np.zeros(volume.shape, np.uint8)
    labels[a], labels[b] = 1, 5  # spleen and liver of the tiny model's label set
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing((1.0, 1.0, 2.5))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    img_path, lab_path = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    sitk.WriteImage(image, str(img_path))
    sitk.WriteImage(label_image, str(lab_path))
    return img_path, lab_path


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """CLI commands run in-process attach log handlers to the stderr pytest captured for that test; drop them
    afterwards so later tests do not log into a closed capture."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)


@pytest.fixture
def base_file(tmp_path):
    return make_tiny_model_file(tmp_path / "base.safetensors", seed=2)


def test_finetune_then_segment(tmp_path, base_file, capsys):
    img, lab = blob_files(tmp_path)
    before = sha(base_file), sha(lab)
    out = tmp_path / "mine.safetensors"
    assert run("finetune", img, lab, "--slices", "0,2-4", "--out", out, "--base", base_file, "--steps", "4",
               *FAST) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "hsam segment" in printed
    desc = read_description(out)
    entry = desc.provenance["finetune"]
    assert entry["slices"]["corrected"] == [0, 2, 3, 4] and entry["base"]["source"] == str(base_file)
    assert desc.labels.name == "synapse-8-organs"  # a trained base keeps its label set and heads
    assert (sha(base_file), sha(lab)) == before
    seg = tmp_path / "seg.nrrd"
    assert run("segment", img, seg, "--checkpoint", out, "--quiet") == 0
    assert sitk.ReadImage(str(seg)).GetSize() == (32, 32, 6)
    # guided by the corrected slices: they keep their labels exactly, the others are segmented
    guided = tmp_path / "guided.seg.nrrd"
    assert run("segment", img, guided, "--checkpoint", out, "--guide-labels", lab, "--guide-slices", "0,2-4",
               "--quiet") == 0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(guided)))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
    assert result.shape == labels.shape and np.array_equal(result[[0, 2, 3, 4]], labels[[0, 2, 3, 4]])
    assert "guided by the corrected slices 0,2-4" in capsys.readouterr().out
    assert run("segment", img, tmp_path / "x.nrrd", "--checkpoint", out, "--guide-labels", lab, "--quiet") == 2
    assert "needs --guide-slices" in capsys.readouterr().err


def test_label_table_names_new_classes(tmp_path, base_file):
    img, lab = blob_files(tmp_path)
    table = tmp_path / "classes.csv"
    table.write_text("value,name,r,g,b\n1,left blob,255,0,0\n5,right blob,0,0,255\n", encoding="utf-8")
    out = tmp_path / "new.safetensors"
    assert run("finetune", img, lab, "--slices", "1,3", "--out", out, "--base", base_file, "--labels", table,
               "--epochs", "1", *FAST) == 0
    desc = read_description(out)
    assert [c.name for c in desc.labels.classes] == ["left blob", "right blob"]
    assert desc.provenance["finetune"]["labels"]["reinitialised"] == ["left blob", "right blob"]


@pytest.mark.parametrize("args, message", [
    (["--slices", "2,40"], "slice indices [40] lie outside the volume"),
    (["--slices", ""], "no corrected slice"),
    (["--slices", "1", "--mode", "full", "--base", "litemedsam-base"], "full fine-tuning trains the LoRA adapters"),
])
def test_bad_input_is_a_clear_message(tmp_path, base_file, capsys, args, message):
    img, lab = blob_files(tmp_path)
    out = tmp_path / "x.safetensors"
    argv = ["finetune", img, lab, "--out", out, *FAST, *args]
    if "--base" not in args:
        argv += ["--base", base_file]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_labels_on_another_grid_and_unknown_values(tmp_path, base_file, capsys):
    img, lab = blob_files(tmp_path)
    other = sitk.ReadImage(str(lab))
    other.SetOrigin((5.0, 0.0, 0.0))
    moved = tmp_path / "moved.nrrd"
    sitk.WriteImage(other, str(moved))
    assert run("finetune", img, moved, "--slices", "1", "--base", base_file, *FAST) == 2
    assert "not on the image's voxel grid" in capsys.readouterr().err
    bad = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
    bad[2, :2, :2] = 77
    bad_img = sitk.GetImageFromArray(bad)
    bad_img.CopyInformation(other)
    bad_img.SetOrigin((0.0, 0.0, 0.0))
    bad_path = tmp_path / "bad.nrrd"
    sitk.WriteImage(bad_img, str(bad_path))
    assert run("finetune", img, bad_path, "--slices", "2", "--base", base_file, *FAST) == 2
    assert "label values [77]" in capsys.readouterr().err


def test_seg_nrrd_labels_name_the_classes(tmp_path, base_file):
    from hsam.data.labels import LabelClass, LabelSet
    from hsam.data.segfile import write_segmentation

    img, lab = blob_files(tmp_path)
    labels = sitk.ReadImage(str(lab))
    arr = sitk.GetArrayFromImage(labels)
    arr[arr == 5] = 2
    seg_img = sitk.GetImageFromArray(arr)
    seg_img.CopyInformation(labels)
    classes = LabelSet("drawn", (LabelClass(1, "tumour", (250, 0, 0)), LabelClass(2, "cyst", (0, 250, 0))))
    seg = tmp_path / "drawn.seg.nrrd"
    write_segmentation(seg_img, classes, seg)
    out = tmp_path / "seg-model.safetensors"
    assert run("finetune", img, seg, "--slices", "0,3", "--out", out, "--base", base_file, "--epochs", "1",
               *FAST) == 0
    desc = read_description(out)
    assert [(c.name, c.color) for c in desc.labels.classes] == [("tumour", (250, 0, 0)), ("cyst", (0, 250, 0))]


def test_worker_finetune_stream(tmp_path, base_file):
    img, lab = blob_files(tmp_path)
    out = tmp_path / "w.safetensors"
    proc = subprocess.run([sys.executable, "-m", "hsam.worker", "finetune", "--image", str(img), "--labels", str(lab),
                           "--slices", "0,1,3,5", "--out", str(out), "--base", str(base_file), "--epochs", "2",
                           "--device", "cpu", "--precision", "fp32"],
                          capture_output=True, text=True, timeout=600)
    messages = [wp.decode(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, proc.stderr
    stages = [m.stage for m in messages if isinstance(m, wp.Progress)]
    assert "embed" in stages and stages[-1] == "train"
    train = [(m.done, m.total) for m in messages if isinstance(m, wp.Progress) and m.stage == "train"]
    assert train[-1] == (2, 2)
    result = messages[-1]
    assert isinstance(result, wp.Result) and result.output == str(out) and out.is_file()
    assert result.labels["name"] == "synapse-8-organs"
    assert any("validation Dice" in m.message for m in messages if isinstance(m, wp.Log))


def test_worker_finetune_bad_input(tmp_path, base_file):
    img, lab = blob_files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "hsam.worker", "finetune", "--image", str(img), "--labels", str(lab),
                           "--slices", "99", "--base", str(base_file)], capture_output=True, text=True, timeout=300)
    messages = [wp.decode(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2
    assert isinstance(messages[-1], wp.Error) and messages[-1].kind == "input"
    assert "outside the volume" in messages[-1].message


DATA = Path("/usr/share/mricron/templates")


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "ch2.nii.gz").is_file(), reason="needs the Debian package mricron-data")
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run("demo", "--quick", "--out", out, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "contour interpolation" in printed or "nearest" in printed
    for name in ("colin27_hsam.seg.nrrd", "colin27_hsam_guided.seg.nrrd", "colin27_atlas.seg.nrrd",
                 "colin27_t1.nii.gz", "overlay.png", "dice.md", "dice.json", "model.safetensors"):
        assert (out / name).is_file(), name
    seg = sitk.ReadImage(str(out / "colin27_hsam.seg.nrrd"))
    assert seg.GetSize() == (181, 217, 181)
    names = {seg.GetMetaData(k) for k in seg.GetMetaDataKeys() if k.startswith("Segment") and k.endswith("_Name")}
    assert {"frontal lobe", "temporal lobe", "cerebellum"} <= names
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    report = json.loads((out / "dice.json").read_text())
    methods = report["levels"][0]["methods"]
    assert {"hsam", "hsam-guided", "nearest"} <= set(methods)
    assert all(0 <= m["mean_dice"] <= 1 for m in methods.values())
