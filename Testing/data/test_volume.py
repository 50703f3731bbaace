"""Reading volumes (NIfTI, NRRD, MetaImage, DICOM series) and refusing what cannot be segmented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.data.volume import READ_WARNINGS_KEY, check_image, list_dicom_series, read_image
from hsam.errors import InputVolumeError

SIZE = (24, 20, 12)  # i, j, k
SPACING = (0.75, 0.8, 2.5)
ORIGIN = (-120.5, 33.0, -410.25)
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def ct_array(shape=SIZE[::-1], seed=0) -> np.ndarray:
    """A CT-like (k, j, i) int16 volume: air around a soft-tissue body with a bright spot."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000, dtype=np.int16)
    array[:, 3:-3, 4:-4] = rng.integers(-100, 200, size=array[:, 3:-3, 4:-4].shape)
    array[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 1200
    return array


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    p, q = [x for x in range(3) if x != axis]
    m = np.eye(3)
    m[p, p], m[p, q], m[q, p], m[q, q] = c, -s, s, c
    return m


def make_image(array: np.ndarray, direction=np.eye(3), spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def write_dicom_series(folder: Path, volume: sitk.Image, series_uid: str, modality: str = "CT",
                       prefix: str = "img", skip: tuple[int, ...] = ()) -> None:
    """One DICOM file per k-slice, with the geometry tags a reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in list(direction[:, 0]) + list(direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetSize()[2]):
        if k in skip:
            continue
        one = volume[:, :, k:k + 1]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality, "0008|0016": CT_SOP_CLASS, "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99", "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position), "0020|0037": orientation,
            "0028|0030": f"{volume.GetSpacing()[1]}\\{volume.GetSpacing()[0]}",
            "0018|0050": str(volume.GetSpacing()[2]), "0008|103e": f"series {series_uid[-1]}",
        }
        for key, value in tags.items():
            one.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(one)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=tol, atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# ------------------------------------------------------------------------------------------------ files

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_file_round_trip(tmp_path, suffix):
    direction = rotation(0, 20) @ rotation(2, 20) @ np.diag([1, 1, -1])  # oblique, left-handed
    image = make_image(ct_array(), direction)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    read = read_image(path)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert_same_geometry(read, image, tol=1e-5 if suffix.startswith(".nii") else 1e-12)
    assert check_image(read) == []


def test_detached_nrrd_header(tmp_path):
    image = make_image(ct_array())
    sitk.WriteImage(image, str(tmp_path / "ct.nhdr"))
    read = read_image(str(tmp_path / "ct.nhdr"))
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_missing_path(tmp_path):
    with pytest.raises(InputVolumeError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")


def test_damaged_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputVolumeError, match="cannot read .*broken.nii.gz.*damaged"):
        read_image(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputVolumeError, match="not recognised"):
        read_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nrrd"
    path.write_bytes(b"")
    with pytest.raises(InputVolumeError, match="empty file"):
        read_image(path)


# ------------------------------------------------------------------------------------------------ DICOM

def test_dicom_series_round_trip_picks_the_largest_series(tmp_path):
    folder = tmp_path / "dicom"
    big = make_image(ct_array())
    small = make_image(ct_array(shape=(3, 20, 24), seed=5))
    write_dicom_series(folder, big, "1.2.826.0.1.3680043.2.1125.1", prefix="a")
    write_dicom_series(folder, small, "1.2.826.0.1.3680043.2.1125.2", prefix="b")
    assert [s.num_files for s in list_dicom_series(folder)] == [12, 3]

    read = read_image(folder)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(big))
    assert_same_geometry(read, big, tol=1e-5)
    assert read.GetMetaData("0008|0060") == "CT"
    warnings = check_image(read)
    assert any("2 DICOM series" in w and "1.2.826.0.1.3680043.2.1125.2" in w for w in warnings)

    chosen = read_image(folder, series_uid="1.2.826.0.1.3680043.2.1125.2")
    assert chosen.GetSize() == (24, 20, 3)
    assert np.array_equal(sitk.GetArrayFromImage(chosen), sitk.GetArrayFromImage(small))


def test_single_dicom_file_reads_its_series(tmp_path):
    folder = tmp_path / "dicom"
    image = make_image(ct_array())
    write_dicom_series(folder, image, "1.2.826.0.1.3680043.2.1125.7")
    write_dicom_series(folder, make_image(ct_array(shape=(3, 20, 24))), "1.2.826.0.1.3680043.2.1125.17", prefix="b")
    read = read_image(folder / "img005.dcm")
    assert read.GetSize() == SIZE
    other = read_image(folder / "img005.dcm", series_uid="1.2.826.0.1.3680043.2.1125.17")
    assert other.GetSize() == (24, 20, 3)


def test_oblique_dicom_series(tmp_path):
    direction = rotation(0, 15) @ rotation(2, 15)
    image = make_image(ct_array(), direction)
    write_dicom_series(tmp_path / "obl", image, "1.2.826.0.1.3680043.2.1125.3")
    read = read_image(tmp_path / "obl")
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert_same_geometry(read, image, tol=1e-5)


def test_unknown_series_uid_lists_what_is_there(tmp_path):
    write_dicom_series(tmp_path / "d", make_image(ct_array()), "1.2.826.0.1.3680043.2.1125.4")
    with pytest.raises(InputVolumeError, match=r"no DICOM series with UID 9\.9.*1\.2\.826\.0\.1\.3680043\.2\.1125\.4 "
                                               r"\(12 files"):
        read_image(tmp_path / "d", series_uid="9.9")


def test_missing_slice_is_warned(tmp_path):
    write_dicom_series(tmp_path / "gap", make_image(ct_array()), "1.2.826.0.1.3680043.2.1125.5", skip=(6,))
    read = read_image(tmp_path / "gap")
    assert read.GetSize()[2] == 11
    assert any("not evenly spaced" in w for w in check_image(read))


def test_mr_series_given_to_a_ct_model_is_warned(tmp_path):
    write_dicom_series(tmp_path / "mr", make_image(ct_array()), "1.2.826.0.1.3680043.2.1125.6", modality="MR")
    assert any("series is MR" in w for w in check_image(read_image(tmp_path / "mr")))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputVolumeError, match="is empty"):
        read_image(tmp_path / "empty")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    with pytest.raises(InputVolumeError, match="no DICOM series found"):
        read_image(tmp_path / "docs")


def test_folder_with_series_in_a_subfolder_says_where(tmp_path):
    write_dicom_series(tmp_path / "study" / "series1", make_image(ct_array()), "1.2.826.0.1.3680043.2.1125.8")
    (tmp_path / "study" / "DICOMDIR.txt").write_text("index")
    with pytest.raises(InputVolumeError, match="series1"):
        read_image(tmp_path / "study")


# ------------------------------------------------------------------------------------------------ checks

def test_2d_image_is_refused():
    with pytest.raises(InputVolumeError, match="2D"):
        check_image(sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(8, 8)))


def test_2d_file_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(8, 8)), str(tmp_path / "a.nrrd"))
    with pytest.raises(InputVolumeError, match="2D"):
        check_image(read_image(tmp_path / "a.nrrd"))


def test_4d_image_is_refused():
    image = sitk.Image([4, 5, 6, 3], sitk.sitkInt16)
    with pytest.raises(InputVolumeError, match="4D.*extract one 3D frame"):
        check_image(image)


def test_rgb_image_is_refused():
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), dtype=np.uint8), isVector=True)
    with pytest.raises(InputVolumeError, match="3 values per voxel"):
        check_image(rgb)


def test_nan_and_inf_are_counted():
    array = ct_array().astype(np.float32)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    array[2, 2, 2] = -np.inf
    with pytest.raises(InputVolumeError, match="3 NaN and 2 infinite voxels"):
        check_image(make_image(array))


def test_constant_volume_is_refused():
    with pytest.raises(InputVolumeError, match=r"all 5760 voxels have the same value -1000"):
        check_image(make_image(np.full(SIZE[::-1], -1000, np.int16)))


def test_line_is_refused():
    with pytest.raises(InputVolumeError, match="line"):
        check_image(make_image(np.arange(12, dtype=np.int16).reshape(12, 1, 1)))


def test_single_slice_passes_the_generic_check():
    assert check_image(make_image(ct_array(shape=(1, 20, 24)))) == []


@pytest.mark.parametrize("low, high, dtype, phrase", [
    (0, 255, np.uint8, "8-bit"),
    (0, 4000, np.int16, "MR intensities or raw CT stored values"),
    (-300, 1500, np.int16, "no voxel is below -500"),
])
def test_non_hu_ranges_warn_for_ct(low, high, dtype, phrase):
    array = np.random.default_rng(0).integers(low, high + 1, size=SIZE[::-1]).astype(dtype)
    warnings = check_image(make_image(array))
    assert len(warnings) == 1 and phrase in warnings[0] and "Hounsfield" in warnings[0]
    assert check_image(make_image(array), modality="MR") == []


def test_read_warnings_are_reported():
    image = make_image(ct_array())
    image.SetMetaData(READ_WARNINGS_KEY, "first note\nsecond note")
    assert check_image(image) == ["first note", "second note"]
