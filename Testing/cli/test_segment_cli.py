"""``hsam segment`` end to end on files: formats, geometry, Slicer metadata, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam_testlib import ct_like_volume, make_tiny_model_file
from hsam.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def oblique_flipped(image):
    """The same voxels with a left-handed, rotated direction and an odd origin."""
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rot @ np.diag([-1.0, 1.0, 1.0])
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((12.5, -40.25, 101.0))
    return image


def assert_same_grid(a, b):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.fixture
def ct_file(tmp_path):
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(oblique_flipped(ct_like_volume()), str(path))
    return path


def test_seg_nrrd_output_is_a_named_segmentation_on_the_input_grid(tmp_path, ct_file, tiny_model_file, capsys):
    out = tmp_path / "result.seg.nrrd"
    assert run("segment", ct_file, out, "--checkpoint", tiny_model_file, "--quiet") == 0
    assert "wrote" in capsys.readouterr().out
    result = sitk.ReadImage(str(out))
    assert_same_grid(result, sitk.ReadImage(str(ct_file)))
    keys = {k: result.GetMetaData(k) for k in result.GetMetaDataKeys()}
    names = [v for k, v in keys.items() if k.endswith("_Name") and k.startswith("Segment")]
    assert {"liver", "spleen", "pancreas", "right kidney"} <= set(names)
    assert any("SCT^10200004^Liver" in v for k, v in keys.items() if k.endswith("_Tags"))
    assert keys["HSAM_Model"] == "tiny-test"


def test_label_map_output_matches_seg_nrrd(tmp_path, ct_file, tiny_model_file):
    seg, lab = tmp_path / "a.seg.nrrd", tmp_path / "a.nii.gz"
    assert run("segment", ct_file, seg, "--checkpoint", tiny_model_file, "--quiet") == 0
    assert run("segment", ct_file, lab, "--checkpoint", tiny_model_file, "--quiet", "--batch-size", "4") == 0
    a, b = sitk.ReadImage(str(seg)), sitk.ReadImage(str(lab))
    assert b.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert_same_grid(b, sitk.ReadImage(str(ct_file)))


def test_dicom_folder_input(tmp_path, tiny_model_file):
    image = ct_like_volume(shape=(3, 32, 32))
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",
                           "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in origin),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.8\\0.8",
                           "0018|0050": "2.5"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    out = tmp_path / "dicom.seg.nrrd"
    assert run("segment", folder, out, "--checkpoint", tiny_model_file, "--quiet") == 0
    assert sitk.ReadImage(str(out)).GetSize() == (32, 32, 3)


def test_single_axial_slice_is_segmented(tmp_path, tiny_model_file):
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(ct_like_volume(shape=(1, 30, 36)), str(path))
    out = tmp_path / "one.nii.gz.out.nii.gz"
    assert run("segment", path, out, "--checkpoint", tiny_model_file, "--quiet") == 0
    assert sitk.ReadImage(str(out)).GetSize() == (36, 30, 1)


def test_non_ct_range_warns_but_runs(tmp_path, tiny_model_file, capsys):
    arr = (np.random.default_rng(1).random((4, 24, 24)) * 255).astype(np.uint8)
    path = tmp_path / "photo_like.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    out = tmp_path / "r.nrrd"
    assert run("segment", path, out, "--checkpoint", tiny_model_file) == 0
    assert "HU" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- bad input
def _write(tmp_path, name, image):
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def _nan_volume():
    arr = sitk.GetArrayFromImage(ct_like_volume()).astype(np.float32)
    arr[2, 5, 5] = np.nan
    arr[3, 1, 1] = np.inf
    return sitk.GetImageFromArray(arr)


BAD_INPUTS = {
    "2d": (lambda tmp: _write(tmp, "flat.nrrd", sitk.GetImageFromArray(np.zeros((20, 20), np.int16) + 5)), "2D"),
    "4d": (lambda tmp: _write(tmp, "time.nrrd", sitk.JoinSeries([ct_like_volume(shape=(3, 10, 10))] * 2)), "4D"),
    "rgb": (lambda tmp: _write(tmp, "rgb.nrrd", sitk.GetImageFromArray(np.zeros((3, 10, 10, 3), np.uint8),
                                                                        isVector=True)), "RGB|vector|component"),
    "nan": (lambda tmp: _write(tmp, "nan.nrrd", _nan_volume()), "NaN"),
    "constant": (lambda tmp: _write(tmp, "flat.nii.gz", sitk.GetImageFromArray(np.full((4, 10, 10), -1000, np.int16))),
                 "constant|empty"),
    "sagittal": (lambda tmp: _write(tmp, "sag.nrrd", sitk.GetImageFromArray(
        sitk.GetArrayFromImage(ct_like_volume(shape=(8, 20, 1))))), "sagittal"),
    "missing": (lambda tmp: tmp / "nope.nii.gz", "does not exist"),
    "garbage": (lambda tmp: (tmp / "junk.nii.gz").write_bytes(b"not an image at all" * 10) and tmp / "junk.nii.gz",
                "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_clear_error_no_output(case, tmp_path, tiny_model_file, capsys):
    make, pattern = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out.seg.nrrd"
    code = run("segment", path, out, "--checkpoint", tiny_model_file, "--quiet")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.") or ".tmp" in p.name]


def test_existing_output_untouched_when_run_fails(tmp_path, tiny_model_file):
    out = tmp_path / "keep.nii.gz"
    out.write_bytes(b"precious")
    assert run("segment", tmp_path / "missing.nrrd", out, "--checkpoint", tiny_model_file, "--quiet") == 2
    assert out.read_bytes() == b"precious"


def test_missing_truncated_and_tampered_model_files(tmp_path, ct_file, tiny_model_file, capsys):
    out = tmp_path / "o.nrrd"
    assert run("segment", ct_file, out, "--checkpoint", tmp_path / "none.safetensors") == 2
    assert "not found" in capsys.readouterr().err
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(Path(tiny_model_file).read_bytes()[:-1000])
    assert run("segment", ct_file, out, "--checkpoint", truncated) == 2
    assert "truncated" in capsys.readouterr().err.lower()
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(Path(tiny_model_file).read_bytes())
    data[-50] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert run("segment", ct_file, out, "--checkpoint", tampered) == 2
    assert "tamper" in capsys.readouterr().err.lower() or "hash" in capsys.readouterr().err.lower()
    assert not out.exists()


def test_wrong_architecture_refused(tmp_path, ct_file, tiny_model_file, capsys):
    """A file whose tensors do not fit the architecture its description names."""
    import torch

    from hsam.weights.modelfile import read_model_file, save_model_file

    state, description = read_model_file(tiny_model_file)
    state = dict(state)
    state["stage2.mask_tokens.weight"] = torch.zeros(5, 32)
    bad = tmp_path / "bad.safetensors"
    save_model_file(bad, state, description)
    assert run("segment", ct_file, tmp_path / "o.nrrd", "--checkpoint", bad) == 2
    assert "do not fit" in capsys.readouterr().err


def test_untrained_base_model_refused(tmp_path, ct_file, capsys):
    base = make_tiny_model_file(tmp_path / "base.safetensors", provenance={"heads_trained": False})
    assert run("segment", ct_file, tmp_path / "o.nrrd", "--checkpoint", base) == 2
    assert "base model" in capsys.readouterr().err


def test_official_file_without_sam_checkpoint(tmp_path, ct_file, capsys):
    import torch
    official = tmp_path / "220_epoch_299.pth"
    torch.save({"w_a_000": torch.zeros(5, 8), "mask_decoder2.mask_tokens.weight": torch.zeros(9, 8)}, official)
    assert run("segment", ct_file, tmp_path / "o.nrrd", "--checkpoint", official) == 2
    assert "--sam-checkpoint" in capsys.readouterr().err


def test_unpicklable_checkpoint_is_refused_not_executed(tmp_path, ct_file, capsys):
    """weights_only loading: a pickle that would run code is refused."""
    import pickle
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch
    torch.save({"x": Payload()}, evil, pickle_module=pickle)
    assert run("segment", ct_file, tmp_path / "o.nrrd", "--checkpoint", evil) == 2
    assert not marker.exists()
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_no_model_available_says_how_to_get_one(tmp_path, ct_file, capsys):
    assert run("segment", ct_file, tmp_path / "o.nrrd") == 2
    err = capsys.readouterr().err
    assert "hsam models fetch" in err or "hsam models import" in err
