"""Writing results: Slicer ``.seg.nrrd`` (checked with Slicer's own MRML libraries) and plain label maps;
atomic writes; reading label maps back onto the image grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.data import segfile
from hsam.data.labels import SYNAPSE_ORGANS, LabelClass, LabelSet, Terminology
from hsam.data.segfile import (ijk_to_ras, read_labels, segment_id, write_color_table, write_label_map,
                               write_segmentation)
from hsam.errors import HSAMError, InputVolumeError

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

SIZE = (24, 20, 12)  # i, j, k
ABSENT = 4  # gallbladder: left out of the label image, must still be a (empty) segment


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    p, q = [x for x in range(3) if x != axis]
    m = np.eye(3)
    m[p, p], m[p, q], m[q, p], m[q, q] = c, -s, s, c
    return m


GEOMETRIES = {
    "axial": (np.eye(3), (0.75, 0.75, 2.5), (-100.0, 50.0, -300.0)),
    "oblique-anisotropic-left-handed": (rotation(0, 20) @ rotation(2, 20) @ np.diag([1, 1, -1]),
                                        (0.7, 1.3, 2.9), (12.5, -40.25, 100.0)),
    "permuted-left-handed": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float), (1.1, 0.6, 3.3),
                             (5.0, 6.0, -7.0)),
}


def label_image(geometry: str, seed: int = 0) -> sitk.Image:
    direction, spacing, origin = GEOMETRIES[geometry]
    rng = np.random.default_rng(seed)
    values = [v for v in SYNAPSE_ORGANS.values if v != ABSENT]
    array = np.zeros(SIZE[::-1], dtype=np.uint8)
    for value in values:  # a few boxes per class, some overlapping (later wins)
        for _ in range(2):
            lo = [rng.integers(0, n - 2) for n in array.shape]
            hi = [min(n, a + rng.integers(1, 6)) for a, n in zip(lo, array.shape)]
            array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    array[0, 0, 0] = 1  # a corner voxel, so a flipped axis cannot go unnoticed
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    return image


def nrrd_header(path: Path) -> dict[str, str]:
    """Custom ``key:=value`` fields of a NRRD header (the header is plain text even with gzip data)."""
    text = path.read_bytes().split(b"\n\n", 1)[0].decode("utf-8")
    return dict(line.split(":=", 1) for line in text.splitlines() if ":=" in line)


# ----------------------------------------------------------------------------------- Slicer helpers

def slicer_read_segmentation(path: Path):
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    return scene, node


def matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def segment_on_reference_grid(node, segment_id_: str, reference: sitk.Image) -> np.ndarray:
    """The segment's voxels as a (k, j, i) boolean mask on ``reference``'s grid, located physically:
    every voxel centre of Slicer's binary labelmap (IJK→RAS from Slicer) is mapped to the reference's
    index space and must land exactly on a voxel centre."""
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(segment_id_, labelmap)
    mask = np.zeros(reference.GetSize()[::-1], dtype=bool)
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return mask
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    ijk_to_ras_slicer = matrix_to_numpy(matrix)
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.nonzero(values)
    if len(i) == 0:
        return mask
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    ras = ijk_to_ras_slicer @ ijk
    ref_index = np.linalg.solve(ijk_to_ras(reference), ras)[:3]
    rounded = np.round(ref_index)
    assert np.abs(ref_index - rounded).max() < 1e-4, "Slicer's voxels are not on the reference grid"
    ri, rj, rk = rounded.astype(int)
    size = reference.GetSize()
    assert ri.min() >= 0 and rj.min() >= 0 and rk.min() >= 0
    assert ri.max() < size[0] and rj.max() < size[1] and rk.max() < size[2]
    mask[rk, rj, ri] = True
    assert mask.sum() == len(ri), "two Slicer voxels fell on one reference voxel"
    return mask


# ----------------------------------------------------------------------------------------- .seg.nrrd

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_seg_nrrd_opens_in_slicer_with_names_colours_terminology_and_exact_voxels(tmp_path, geometry):
    image = label_image(geometry)
    labels = sitk.GetArrayFromImage(image)
    path = write_segmentation(image, SYNAPSE_ORGANS, tmp_path / "result.seg.nrrd",
                              extra_metadata={"HSAM_Model": "test-model"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd"]

    _scene, node = slicer_read_segmentation(path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(SYNAPSE_ORGANS.classes)
    rebuilt = np.zeros_like(labels)
    for n, label_class in enumerate(SYNAPSE_ORGANS.classes):
        sid = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(sid)
        assert sid == segment_id(label_class.value)
        assert segment.GetName() == label_class.name
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        np.testing.assert_allclose(segment.GetColor(), np.array(label_class.color) / 255.0, atol=1e-9)
        assert segment.GetLabelValue() == label_class.value
        tag = vtk.mutable("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        assert str(tag) == label_class.terminology.to_slicer_tag().rstrip("|")
        assert Terminology.from_slicer_tag(str(tag)) == label_class.terminology
        mask = segment_on_reference_grid(node, sid, image)
        assert np.array_equal(mask, labels == label_class.value), label_class.name
        assert not np.any(rebuilt[mask])
        rebuilt[mask] = label_class.value
    assert np.array_equal(rebuilt, labels)
    assert not np.any(labels == ABSENT)

    # Slicer knows the reference grid (what the segment editor uses when editing)
    geometry_text = segmentation.GetConversionParameter("Reference image geometry")
    reference_grid = slicer.vtkOrientedImageData()
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry_text, reference_grid, False)
    matrix = vtk.vtkMatrix4x4()
    reference_grid.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(matrix_to_numpy(matrix), ijk_to_ras(image), atol=1e-12)
    assert reference_grid.GetExtent() == (0, SIZE[0] - 1, 0, SIZE[1] - 1, 0, SIZE[2] - 1)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_seg_nrrd_reopens_identically_in_simpleitk(tmp_path, geometry):
    image = label_image(geometry)
    path = write_segmentation(image, SYNAPSE_ORGANS, tmp_path / "r.seg.nrrd")
    read = sitk.ReadImage(str(path))
    assert read.GetPixelID() == sitk.sitkUInt8 and read.GetNumberOfComponentsPerPixel() == 1
    assert read.GetSize() == image.GetSize()
    assert read.GetOrigin() == image.GetOrigin()
    # NRRD stores direction × spacing per axis; splitting it again may differ in the last bit (1e-16)
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), rtol=1e-14, atol=0)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), rtol=0, atol=1e-14)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_seg_nrrd_header_fields(tmp_path):
    image = label_image("axial")
    path = write_segmentation(image, SYNAPSE_ORGANS, tmp_path / "r.seg.nrrd", extra_metadata={"HSAM_Model": "m1"})
    header = nrrd_header(path)
    liver = SYNAPSE_ORGANS.by_value(5)
    n = SYNAPSE_ORGANS.classes.index(liver)
    assert header[f"Segment{n}_ID"] == "Segment_5"
    assert header[f"Segment{n}_Name"] == "liver"
    assert header[f"Segment{n}_NameAutoGenerated"] == "0"
    assert header[f"Segment{n}_ColorAutoGenerated"] == "0"
    assert [float(c) for c in header[f"Segment{n}_Color"].split()] == pytest.approx([221 / 255, 130 / 255, 101 / 255])
    assert header[f"Segment{n}_LabelValue"] == "5"
    assert header[f"Segment{n}_Layer"] == "0"
    assert header[f"Segment{n}_Extent"] == "0 23 0 19 0 11"
    assert header[f"Segment{n}_Tags"] == ("TerminologyEntry:Segmentation category and type - DICOM master list"
                                          "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
                                          "~Anatomic codes - DICOM master list~^^~^^|")
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["Segmentation_ConversionParameters"].startswith(
        "Reference image geometry|-0.75;0;0;100;0;-0.75;0;-50;0;0;2.5;-300;0;0;0;1;0;23;0;19;0;11;|")  # IJK→RAS
    assert header["HSAM_Model"] == "m1" and header["HSAM_LabelSet"] == "synapse-8-organs"
    assert "Segmentation_Extent" not in header  # its presence would make Slicer treat the file as legacy
    assert f"Segment{len(SYNAPSE_ORGANS.classes)}_ID" not in header


def test_class_without_terminology_and_custom_values(tmp_path):
    labelset = LabelSet("custom", (LabelClass(7, "thing one", (1, 2, 3)), LabelClass(200, "thing two", (4, 5, 6))))
    image = label_image("axial")
    array = sitk.GetArrayFromImage(image)
    relabelled = np.where(array == 1, 7, np.where(array == 2, 200, 0)).astype(np.uint8)
    out = sitk.GetImageFromArray(relabelled)
    out.CopyInformation(image)
    path = write_segmentation(out, labelset, tmp_path / "c.seg.nrrd")
    _scene, node = slicer_read_segmentation(path)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["thing one", "thing two"]
    assert [segmentation.GetNthSegment(n).GetLabelValue() for n in range(2)] == [7, 200]
    assert np.array_equal(segment_on_reference_grid(node, "Segment_200", image), relabelled == 200)


def test_values_outside_the_label_set_are_refused_and_nothing_is_written(tmp_path):
    image = label_image("axial")
    array = sitk.GetArrayFromImage(image)
    array[1, 1, 1] = 42
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    with pytest.raises(HSAMError, match=r"\[42\] are not in the label set"):
        write_segmentation(bad, SYNAPSE_ORGANS, tmp_path / "x.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_present_values_equals_unique_without_a_full_copy():
    rng = np.random.default_rng(0)
    for shape in [(40, 9, 7), (3, 5, 5), (17, 4, 4)]:
        array = rng.choice(np.array([0, 1, 3, 200], np.uint8), size=shape, p=[0.97, 0.01, 0.01, 0.01])
        array[-1, -1, -1] = 7  # a value only in the last plane
        assert np.array_equal(segfile.present_values(array), np.unique(array))
    assert np.array_equal(segfile.present_values(np.zeros((33, 2, 2), np.uint8)), [0])


# ------------------------------------------------------------------------------------------ label maps

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_plain_label_map_round_trip(tmp_path, suffix):
    image = label_image("oblique-anisotropic-left-handed")
    path = write_segmentation(image, SYNAPSE_ORGANS, tmp_path / f"labels{suffix}", extra_metadata={"HSAM_Model": "m"})
    read = sitk.ReadImage(str(path))
    assert read.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    tol = 1e-5 if suffix.startswith(".nii") else 0.0
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), rtol=tol)
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), rtol=tol, atol=tol)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=tol)
    if suffix in (".nrrd", ".mha"):
        assert read.GetMetaData("HSAM_Model") == "m"
    assert np.array_equal(read_labels(path, image), sitk.GetArrayFromImage(image))


def test_write_label_map_from_an_int_image(tmp_path):
    image = sitk.Cast(label_image("axial"), sitk.sitkInt32)
    path = write_label_map(image, tmp_path / "l.nrrd")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8
    with pytest.raises(HSAMError, match="needs a label set"):
        write_label_map(image, tmp_path / "l.seg.nrrd")


@pytest.mark.parametrize("name, phrase", [("a.mhd", "two files"), ("a.nhdr", "two files"),
                                          ("a.seg.nhdr", "two files"), ("a.png", "unknown output format")])
def test_unsupported_output_names(tmp_path, name, phrase):
    with pytest.raises(HSAMError, match=phrase):
        write_segmentation(label_image("axial"), SYNAPSE_ORGANS, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder(tmp_path):
    with pytest.raises(HSAMError, match="does not exist"):
        write_segmentation(label_image("axial"), SYNAPSE_ORGANS, tmp_path / "no" / "r.seg.nrrd")


def test_color_table_reads_in_slicer(tmp_path):
    path = write_color_table(SYNAPSE_ORGANS, tmp_path / "synapse.ctbl")
    scene = slicer.vtkMRMLScene()
    table = slicer.vtkMRMLColorTableNode()
    scene.AddNode(table)
    storage = slicer.vtkMRMLColorTableStorageNode()
    scene.AddNode(storage)
    table.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(table) == 1
    for label_class in SYNAPSE_ORGANS.classes:
        assert table.GetColorName(label_class.value) == label_class.name
        rgba = [0.0, 0.0, 0.0, 0.0]
        table.GetColor(label_class.value, rgba)
        np.testing.assert_allclose(rgba[:3], np.array(label_class.color) / 255, atol=1e-9)


# ------------------------------------------------------------------------------------------ atomicity

class FailingWriter:
    """Stands in for SimpleITK's ImageFileWriter: writes part of a file, then fails (e.g. disk quota)."""

    def SetFileName(self, name):  # noqa: N802 (SimpleITK's API)
        self.name = name

    def SetUseCompression(self, flag):  # noqa: N802
        pass

    def Execute(self, image):  # noqa: N802
        Path(self.name).write_bytes(b"NRRD0004\npartial")
        raise RuntimeError("itk::ERROR: ImageFileWriter: simulated failure mid-write")


class InterruptingWriter(FailingWriter):
    def Execute(self, image):  # noqa: N802
        Path(self.name).write_bytes(b"NRRD0004\npartial")
        raise KeyboardInterrupt


@pytest.mark.parametrize("name", ["r.seg.nrrd", "r.nii.gz"])
@pytest.mark.parametrize("writer", [FailingWriter, InterruptingWriter])
def test_failure_mid_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, name, writer):
    old = write_segmentation(label_image("axial", seed=1), SYNAPSE_ORGANS, tmp_path / name)
    before = old.read_bytes()
    monkeypatch.setattr(segfile.sitk, "ImageFileWriter", writer)
    expected = HSAMError if writer is FailingWriter else KeyboardInterrupt
    with pytest.raises(expected):
        write_segmentation(label_image("axial", seed=2), SYNAPSE_ORGANS, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert old.read_bytes() == before
    monkeypatch.undo()
    (tmp_path / name).unlink()
    with pytest.raises(expected):
        monkeypatch.setattr(segfile.sitk, "ImageFileWriter", writer)
        write_segmentation(label_image("axial", seed=2), SYNAPSE_ORGANS, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_file_completely(tmp_path):
    path = tmp_path / "r.seg.nrrd"
    path.write_bytes(b"old contents")
    write_segmentation(label_image("axial"), SYNAPSE_ORGANS, path)
    assert path.read_bytes().startswith(b"NRRD") and sorted(p.name for p in tmp_path.iterdir()) == ["r.seg.nrrd"]


def test_data_is_compressed(tmp_path):
    path = write_segmentation(label_image("axial"), SYNAPSE_ORGANS, tmp_path / "r.seg.nrrd")
    head, data = path.read_bytes().split(b"\n\n", 1)
    assert b"encoding: gzip" in head
    assert gzip.decompress(data)[:1] is not None


# --------------------------------------------------------------------------------------- reading labels

@pytest.mark.parametrize("change, phrase", [
    ("size", "size 24×20×13"), ("spacing", "spacing"), ("origin", "origin"), ("direction", "direction"),
])
def test_read_labels_refuses_another_grid(tmp_path, change, phrase):
    reference = label_image("oblique-anisotropic-left-handed")
    other = sitk.GetImageFromArray(sitk.GetArrayFromImage(reference))
    other.CopyInformation(reference)
    if change == "size":
        other = sitk.GetImageFromArray(np.zeros((13, 20, 24), np.uint8))
        other.SetSpacing(reference.GetSpacing())
        other.SetOrigin(reference.GetOrigin())
        other.SetDirection(reference.GetDirection())
    elif change == "spacing":
        other.SetSpacing([s * 1.01 for s in reference.GetSpacing()])
    elif change == "origin":
        other.SetOrigin([o + 0.3 for o in reference.GetOrigin()])
    else:
        other.SetDirection((np.asarray(reference.GetDirection()).reshape(3, 3) @ rotation(2, 1)).ravel().tolist())
    sitk.WriteImage(other, str(tmp_path / "l.nrrd"))
    with pytest.raises(InputVolumeError, match=f"not on the image's voxel grid: {phrase}.*resample"):
        read_labels(tmp_path / "l.nrrd", reference)


def test_read_labels_tolerates_nifti_float_precision(tmp_path):
    reference = label_image("oblique-anisotropic-left-handed")
    sitk.WriteImage(reference, str(tmp_path / "l.nii.gz"))
    assert np.array_equal(read_labels(tmp_path / "l.nii.gz", reference), sitk.GetArrayFromImage(reference))


def test_read_labels_from_seg_nrrd_maps_segment_names_to_the_label_set(tmp_path):
    reference = label_image("axial")
    array = sitk.GetArrayFromImage(reference)
    slicer_style = LabelSet("made in slicer", (LabelClass(1, "Liver", (1, 1, 1)),
                                               LabelClass(2, "right_kidney", (2, 2, 2))))
    mine = np.where(array == 5, 1, np.where(array == 2, 2, 0)).astype(np.uint8)
    image = sitk.GetImageFromArray(mine)
    image.CopyInformation(reference)
    path = write_segmentation(image, slicer_style, tmp_path / "edited.seg.nrrd")
    assert np.array_equal(read_labels(path, reference), mine)  # no label set: file values
    mapped = read_labels(path, reference, labelset=SYNAPSE_ORGANS)
    assert np.array_equal(mapped, np.where(mine == 1, 5, np.where(mine == 2, 2, 0)))

    odd = LabelSet("odd", (LabelClass(1, "tumour", (1, 1, 1)),))
    path = write_segmentation(sitk.Cast(image > 0, sitk.sitkUInt8), odd, tmp_path / "odd.seg.nrrd")
    with pytest.raises(InputVolumeError, match=r"\['tumour'\].*not classes of the label set"):
        read_labels(path, reference, labelset=SYNAPSE_ORGANS)


def test_read_labels_refuses_non_labels(tmp_path):
    reference = label_image("axial")
    floats = sitk.GetImageFromArray(np.full(SIZE[::-1], 0.5, np.float32))
    floats.CopyInformation(reference)
    sitk.WriteImage(floats, str(tmp_path / "f.nrrd"))
    with pytest.raises(InputVolumeError, match="non-integer"):
        read_labels(tmp_path / "f.nrrd", reference)
    unknown = sitk.GetImageFromArray(np.full(SIZE[::-1], 9, np.uint8))
    unknown.CopyInformation(reference)
    sitk.WriteImage(unknown, str(tmp_path / "u.nrrd"))
    with pytest.raises(InputVolumeError, match=r"\[9\] are not in the label set"):
        read_labels(tmp_path / "u.nrrd", reference, labelset=SYNAPSE_ORGANS)
