"""``hsam evaluate`` on small files: table and JSON contents, .seg.nrrd input, grid checks, folders with a missing
case, and the --synapse mode (with a stand-in for h5py, which the test environment need not have)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.cli import main
from hsam.data.labels import SYNAPSE_ORGANS
from hsam.data.segfile import write_segmentation
from hsam.evaluate_cli import SYNAPSE_TEST_CASES
from hsam.metrics import hd95

SPACING = (0.5, 0.5, 2.0)  # i, j, k (x, y, z) mm


def run(*argv):
    return main([str(a) for a in argv])


def write(path, array, spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def pair():
    """(k, j, i) label maps: class 1 shifted by one slice (Dice 0.75, HD95 1 voxel = 2 mm along k), class 2 only
    in the ground truth, class 3 only predicted."""
    gt = np.zeros((10, 20, 20), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:6, 4:10, 4:10] = 1
    pred[3:7, 4:10, 4:10] = 1
    gt[5:8, 12:16, 12:16] = 2
    pred[0, 0, 0] = 3
    return pred, gt


@pytest.fixture
def files(tmp_path):
    pred, gt = pair()
    return write(tmp_path / "pred.nrrd", pred), write(tmp_path / "gt.nrrd", gt)


def test_files_table_and_json(files, tmp_path, capsys):
    pred, gt = files
    out = tmp_path / "metrics.json"
    assert run("evaluate", pred, gt, "--json", out) == 0
    table = capsys.readouterr().out
    assert "published (voxels)" in table and "correct (mm)" in table
    row1 = next(line for line in table.splitlines() if line.startswith("1 label 1"))
    assert row1.split() == ["1", "label", "1", "0.7500", "1.00", "|", "0.7500", "2.00"]
    row3 = next(line for line in table.splitlines() if line.startswith("3 label 3"))
    assert row3.split()[3:6] == ["1.0000", "0.00", "|"] and "n/a (0/1)" in row3
    data = json.loads(out.read_text())
    assert data["mode"] == "files" and [c["value"] for c in data["classes"]] == [1, 2, 3]
    case = data["cases"][0]
    assert case["spacing_mm"] == list(SPACING)
    assert case["classes"]["1"]["published"] == {"dice": 0.75, "hd95_vox": 1.0}
    assert case["classes"]["1"]["dice"] == 0.75 and case["classes"]["1"]["hd95_mm"] == 2.0
    assert case["classes"]["1"]["gt_voxels"] == 144
    assert case["classes"]["2"]["published"] == {"dice": 0.0, "hd95_vox": 0.0}
    assert case["classes"]["2"]["dice"] == 0.0 and case["classes"]["2"]["hd95_mm"] is None
    assert case["classes"]["3"]["published"] == {"dice": 1.0, "hd95_vox": 0.0}
    assert case["classes"]["3"]["dice"] == 0.0 and case["classes"]["3"]["hd95_mm"] is None
    pub, cor = data["summary"]["published"], data["summary"]["correct"]
    assert pub["mean"]["dice"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert pub["mean"]["hd95_vox"] == pytest.approx(1 / 3)
    assert cor["mean"]["dice"] == pytest.approx(0.25) and cor["mean"]["hd95_mm"] == 2.0
    assert cor["per_class"]["2"]["n_hd95"] == 0 and cor["per_class"]["2"]["hd95_mm"] is None


def test_classes_labels_table_and_json_on_stdout(files, tmp_path, capsys):
    pred, gt = files
    table = tmp_path / "labels.csv"
    table.write_text("value,name\n1,liver\n2,spleen\n3,aorta\n", encoding="utf-8")
    assert run("evaluate", pred, gt, "--labels", table, "--classes", "1,2", "--json", "-") == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [c["name"] for c in data["classes"]] == ["liver", "spleen"]
    assert "1 liver" in captured.err and "aorta" not in captured.err
    assert run("evaluate", pred, gt, "--labels", table, "--classes", "7") == 2
    assert "not classes of the label set" in capsys.readouterr().err


def test_seg_nrrd_prediction(tmp_path, capsys):
    pred, gt = pair()
    image = sitk.GetImageFromArray(pred)
    image.SetSpacing(SPACING)
    seg = write_segmentation(image, SYNAPSE_ORGANS, tmp_path / "pred.seg.nrrd")
    gt_path = write(tmp_path / "gt.nii.gz", gt)
    out = tmp_path / "m.json"
    assert run("evaluate", seg, gt_path, "--classes", "1-3", "--json", out) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["classes"]["1"]["dice"] == 0.75 and case["classes"]["1"]["hd95_mm"] == 2.0
    assert case["classes"]["3"]["pred_voxels"] == 1


def test_grid_mismatch_is_a_clear_error(files, tmp_path, capsys):
    pred, gt = files
    other = write(tmp_path / "other.nrrd", pair()[0], spacing=(0.5, 0.5, 3.0))
    assert run("evaluate", other, gt) == 2
    err = capsys.readouterr().err
    assert "not on the same voxel grid" in err and "spacing" in err and "nearest-neighbour" in err
    smaller = write(tmp_path / "small.nrrd", np.zeros((10, 20, 19), np.uint8))
    assert run("evaluate", smaller, gt) == 2
    assert "size" in capsys.readouterr().err
    assert run("evaluate", tmp_path / "nothing.nrrd", gt) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("evaluate", pred, tmp_path) == 2
    assert "both be files or both be folders" in capsys.readouterr().err


def test_folders_with_a_missing_case(tmp_path, capsys):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    p, g = pair()
    write(gt_dir / "caseA.nii.gz", g)
    write(gt_dir / "caseB.nii.gz", g)
    write(gt_dir / "caseC.nii.gz", g)
    write(pred_dir / "caseA.nii.gz", p)
    write(pred_dir / "caseB_pred.nii.gz", g)  # perfect
    write(pred_dir / "caseZ.nii.gz", p)  # no ground truth
    out = tmp_path / "m.json"
    assert run("evaluate", pred_dir, gt_dir, "--classes", "1,2", "--json", out) == 0
    captured = capsys.readouterr()
    assert "missing caseC: no prediction" in captured.out and "2 cases (1 missing)" in captured.out
    assert "caseZ" in captured.err
    case_rows = [line.split() for line in captured.out.splitlines() if line.startswith("caseB ")]
    assert case_rows == [["caseB", "1.0000", "0.00", "|", "1.0000", "0.00"]]
    data = json.loads(out.read_text())
    assert [c["case"] for c in data["cases"]] == ["caseA", "caseB"]
    assert data["missing"] == [{"case": "caseC", "gt": str(gt_dir / "caseC.nii.gz"),
                                "reason": f"no prediction in {pred_dir}"}]
    cor = data["summary"]["correct"]["per_class"]
    assert cor["1"]["dice"] == pytest.approx((0.75 + 1.0) / 2) and cor["1"]["n_cases"] == 2
    assert cor["2"]["hd95_mm"] == 0.0 and cor["2"]["n_hd95"] == 1  # caseA missed class 2: undefined, left out
    pub = data["summary"]["published"]["per_class"]
    assert pub["2"]["dice"] == 0.5 and pub["2"]["hd95_vox"] == 0.0


# --------------------------------------------------------------------------------------- --synapse

class _FakeH5File:
    """h5py.File stand-in reading an .npz written under an .h5 name (enough for ``handle["label"][:]``)."""

    def __init__(self, path, mode="r"):
        self._data = np.load(path)

    def __enter__(self):
        return self._data

    def __exit__(self, *exc):
        self._data.close()


@pytest.fixture
def fake_h5py(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", types.SimpleNamespace(File=_FakeH5File))


def synapse_gt(number):
    label = np.zeros((4, 12, 12), np.float32)  # (z, y, x), float as TransUNet stores it
    label[1:3, 2:6, 2:6] = 5
    label[1:3, 7:10, 7:10] = 1 + number % 8
    return label


def write_synapse(tmp_path, skip=(38,)):
    data, preds = tmp_path / "Synapse" / "test_vol_h5", tmp_path / "preds"
    data.mkdir(parents=True), preds.mkdir()
    for n in SYNAPSE_TEST_CASES:
        label = synapse_gt(n)
        with open(data / f"case{n:04d}.npy.h5", "wb") as fh:
            np.savez(fh, image=np.zeros_like(label), label=label)
        if n in skip:
            continue
        pred = label.astype(np.uint8).copy()
        pred[3][pred[2] == 5] = 5  # liver one slice thicker, the other organ exact
        write(preds / f"case{n:04d}{'_pred' if n == 1 else ''}.nii.gz", pred, spacing=(1.0, 1.0, 1.0))
    return tmp_path, preds


def test_synapse_mode_needs_h5py(tmp_path, monkeypatch, capsys):
    data, preds = write_synapse(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    assert run("evaluate", "--synapse", data, preds) == 2
    assert "pip install h5py" in capsys.readouterr().err


def test_synapse_mode_evaluates_the_12_test_cases(tmp_path, fake_h5py, capsys):
    data, preds = write_synapse(tmp_path)
    out = tmp_path / "synapse.json"
    assert run("evaluate", "--synapse", data, preds, "--json", out) == 0
    captured = capsys.readouterr()
    assert "missing case0038" in captured.out and "1×1×1" in captured.out
    assert "5 liver" in captured.out and "8 pancreas" in captured.out
    result = json.loads(out.read_text())
    assert result["mode"] == "synapse" and [c["value"] for c in result["classes"]] == list(range(1, 9))
    assert [c["case"] for c in result["cases"]] == [f"case{n:04d}" for n in SYNAPSE_TEST_CASES if n != 38]
    assert result["cases"][0]["pred"].endswith("case0001_pred.nii.gz")
    liver = np.zeros((4, 12, 12), bool)
    liver[1:3, 2:6, 2:6] = True
    thicker = liver.copy()
    thicker[3] = thicker[2]
    expected = hd95(thicker, liver)
    case = result["cases"][0]["classes"]
    assert case["5"]["published"] == {"dice": pytest.approx(2 * 32 / (48 + 32)), "hd95_vox": expected}
    assert case["4"]["published"] == {"dice": 0.0, "hd95_vox": 0.0} and case["4"]["dice"] is None
    # case0003's organ 4 (gallbladder) is present: it is perfect there
    assert result["cases"][2]["classes"]["4"]["published"] == {"dice": 1.0, "hd95_vox": 0.0}


def test_synapse_spacing_from_raw_images_or_option(tmp_path, fake_h5py, capsys):
    data, preds = write_synapse(tmp_path, skip=())
    raw = tmp_path / "raw"
    raw.mkdir()
    for n in SYNAPSE_TEST_CASES:
        write(raw / f"img{n:04d}.nii.gz", np.zeros((4, 12, 12)), spacing=(0.7, 0.7, 3.0))
    out = tmp_path / "s.json"
    assert run("evaluate", "--synapse", data, preds, "--raw-dir", raw, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["missing"] == [] and len(result["cases"]) == 12
    liver = result["cases"][0]["classes"]["5"]
    assert result["cases"][0]["spacing_mm"] == pytest.approx([0.7, 0.7, 3.0])
    assert liver["hd95_mm"] == pytest.approx(3.0) and liver["published"]["hd95_vox"] == 1.0
    assert run("evaluate", "--synapse", data, preds, "--spacing", "0.8,0.8,5", "--json", out) == 0
    assert json.loads(out.read_text())["cases"][0]["classes"]["5"]["hd95_mm"] == pytest.approx(5.0)
    (raw / "img0002.nii.gz").unlink()
    write(raw / "img0002.nii.gz", np.zeros((5, 12, 12)))
    assert run("evaluate", "--synapse", data, preds, "--raw-dir", raw) == 2
    assert "not this case's image" in capsys.readouterr().err


def test_synapse_prediction_on_the_wrong_grid(tmp_path, fake_h5py, capsys):
    data, preds = write_synapse(tmp_path)
    write(preds / "case0002.nii.gz", np.zeros((12, 12, 4)))
    assert run("evaluate", "--synapse", data, preds) == 2
    assert "case0002" in capsys.readouterr().err
