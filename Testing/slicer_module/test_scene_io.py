"""Scene I/O with real MRML: input checks, geometry (oblique, flipped, left-handed, anisotropic), segment
metadata, subject hierarchy, 3D, overwrite with undo, .seg.nrrd and .mrb round trips, failed imports."""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from hsamsegment_testlib import fake_launcher, make_volume, new_scene, oblique_matrix, segment_array, voxel_ras

slicer = pytest.importorskip("slicer")

from hsam.data.labels import SYNAPSE_ORGANS  # noqa: E402
from HSAMSegmentLib import scene_io  # noqa: E402
from HSAMSegmentLib.errors import ImportResultError, SegmentInputError  # noqa: E402
from HSAMSegmentLib.run import JobState, SegmentJob, SegmentRequest  # noqa: E402
from HSAMSegmentLib.selftest import scene_state  # noqa: E402

GEOMETRIES = {
    "LPS-like (DICOM CT)": np.array([[-0.8, 0, 0, 20.0], [0, -0.8, 0, 15.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]]),
    "RAS identity-like": np.array([[0.9, 0, 0, -5.0], [0, 1.1, 0, 3.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]]),
    "oblique": oblique_matrix(),
    "oblique, slice axis flipped (left-handed)": oblique_matrix(flips=(1, 1, -1)),
    "oblique, row axis flipped (left-handed)": oblique_matrix(flips=(1, -1, 1), spacing=(0.5, 1.7, 4.0)),
    "oblique, two flips": oblique_matrix(flips=(-1, -1, 1), angles=(1.1, 0.4, -2.0)),
    "axes permuted (sagittal slices)": np.array([[0, 0, 2.0, -30.0], [0.7, 0, 0, 4.0], [0, -0.6, 0, 50.0],
                                                 [0, 0, 0, 1]]),
}


def run_fake(scene, volume, model, mode="ok", output=None, show3d=False, **env):
    job = SegmentJob(scene, SegmentRequest(volume, model, output, show3d=show3d), fake_launcher(mode, **env),
                     undo=scene_io.UndoStore())
    return job.start().wait(60)


def sphere_for(volume, where=(0.3, 0.6, 0.45)):
    """A RAS sphere inside the volume, off-centre on every axis, a few voxels across."""
    ni, nj, nk = volume.GetImageData().GetDimensions()
    m = scene_io.ijk_to_ras(volume)
    centre = (m @ np.array([where[0] * (ni - 1), where[1] * (nj - 1), where[2] * (nk - 1), 1.0]))[:3]
    radius = 2.2 * float(np.linalg.norm(m[:3, :3], axis=0).max())
    return centre, radius


def expected_labels(volume, centre, radius):
    """What the fake worker must produce, computed here from the node (array order + physical RAS)."""
    array = np.array(scene_io.volume_array(volume))
    expected = np.zeros(array.shape, np.uint8)
    expected[array > 500] = 1
    ras = voxel_ras(volume)
    inside = ((ras - centre.reshape(3, 1, 1, 1)) ** 2).sum(axis=0) <= radius ** 2
    expected[inside] = 5
    return expected


def check_aligned(segmentation, volume, centre, radius):
    expected = expected_labels(volume, centre, radius)
    assert (expected == 5).sum() >= 4 and (expected == 1).sum() >= 4  # the test means something
    for value, segment_id in ((1, "spleen"), (5, "liver"), (2, "right kidney")):
        got = segment_array(segmentation, segment_id, volume)
        np.testing.assert_array_equal(got, (expected == value).astype(np.uint8), err_msg=segment_id)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_segmentation_is_aligned_voxel_for_voxel(scene, fake_model, name):
    volume = make_volume(scene, dims=(18, 14, 9), ijk_to_ras=GEOMETRIES[name])
    before = scene_state(scene, volume)
    centre, radius = sphere_for(volume)
    job = run_fake(scene, volume, fake_model, FAKE_SPHERE=",".join(map(str, [*centre, radius])))
    assert job.state is JobState.SUCCEEDED, job.error_message
    node = job.result_node
    check_aligned(node, volume, centre, radius)
    # Not resampled: the segments' own labelmap lies on the input's grid.
    geometry = slicer.vtkMRMLSegmentationNode()
    geometry.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert node.GetSegmentation().GetConversionParameter(key) == geometry.GetSegmentation().GetConversionParameter(key)
    internal = node.GetSegmentation().GetSegment("liver").GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    matrix = vtk.vtkMatrix4x4()
    internal.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), scene_io.ijk_to_ras(volume), atol=1e-9)
    after = scene_state(scene, volume)
    assert after["voxels"] == before["voxels"] and after["ijk_to_ras"] == before["ijk_to_ras"]
    assert after["volume_mtime"] == before["volume_mtime"]  # the input was not even touched


def test_segments_have_names_colours_terminology_and_sit_in_the_study(scene, fake_model):
    volume = make_volume(scene)
    job = run_fake(scene, volume, fake_model, show3d=True)
    node = job.result_node
    segmentation = node.GetSegmentation()
    assert scene_io.segment_names(node) == [c.name for c in SYNAPSE_ORGANS.classes]
    for cls in SYNAPSE_ORGANS.classes:
        segment = segmentation.GetSegment(cls.name)
        np.testing.assert_allclose(segment.GetColor(), [c / 255 for c in cls.color], atol=1e-6)
        tag = segment.GetTerminology()  # the tag named GetTerminologyEntryTagName()
        assert tag == cls.terminology.to_slicer_tag()
        assert f"SCT^{cls.terminology.type.value}^" in tag
    assert "SCT^24028007^Right" in segmentation.GetSegment("right kidney").GetTerminology()
    assert node.GetAttribute("HSAM.Model") == "fake-model"
    # 3D: closed surfaces exist and the display shows them.
    assert node.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert node.GetDisplayNode() is not None and node.GetDisplayNode().GetVisibility3D()
    # Subject hierarchy: same study as the input volume.
    sh = scene.GetSubjectHierarchyNode()
    study = sh.GetItemParent(sh.GetItemByDataNode(volume))
    assert sh.GetItemLevel(study) == "Study"
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


def test_without_show3d_no_surfaces_are_made(scene, fake_model):
    node = run_fake(scene, make_volume(scene), fake_model, show3d=False).result_node
    assert not node.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())


def test_volume_without_subject_hierarchy_item_and_under_a_transform(scene, fake_model):
    volume = make_volume(scene, in_study=False)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node = run_fake(scene, volume, fake_model).result_node
    assert node.GetTransformNodeID() == transform.GetID()  # overlays the volume wherever it is moved


def test_seg_nrrd_round_trip(scene, fake_model, tmp_path):
    volume = make_volume(scene, ijk_to_ras=oblique_matrix(flips=(1, 1, -1)))
    centre, radius = sphere_for(volume)
    node = run_fake(scene, volume, fake_model, FAKE_SPHERE=",".join(map(str, [*centre, radius]))).result_node
    path = tmp_path / "organs.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    reloaded = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(reloaded)
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded)
    assert scene_io.segment_names(reloaded) == scene_io.segment_names(node)
    for cls in SYNAPSE_ORGANS.classes:
        segment = reloaded.GetSegmentation().GetSegment(reloaded.GetSegmentation().GetSegmentIdBySegmentName(cls.name))
        assert segment.GetTerminology() == cls.terminology.to_slicer_tag()
        np.testing.assert_allclose(segment.GetColor(), [c / 255 for c in cls.color], atol=1e-3)
    reloaded_liver = reloaded.GetSegmentation().GetSegmentIdBySegmentName("liver")
    np.testing.assert_array_equal(segment_array(reloaded, reloaded_liver, volume), segment_array(node, "liver", volume))
    check_aligned(node, volume, centre, radius)


def test_mrb_round_trip(scene, fake_model, tmp_path):
    volume = make_volume(scene, ijk_to_ras=oblique_matrix(flips=(1, -1, 1)))
    centre, radius = sphere_for(volume)
    node = run_fake(scene, volume, fake_model, show3d=True,
                    FAKE_SPHERE=",".join(map(str, [*centre, radius]))).result_node
    path = tmp_path / "scene.mrb"
    assert scene.WriteToMRB(str(path))
    other = new_scene(tmp_path / "other")
    assert other.ReadFromMRB(str(path))
    volumes = [other.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
               for i in range(other.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    segs = [other.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(other.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert [v.GetName() for v in volumes] == ["CT"] and [s.GetName() for s in segs] == [node.GetName()]
    loaded_volume, loaded = volumes[0], segs[0]
    assert scene_io.segment_names(loaded) == [c.name for c in SYNAPSE_ORGANS.classes]
    assert loaded.GetAttribute("HSAM.Model") == "fake-model"
    # Physically the same image and segments (a left-handed volume may come back with its slice order reversed,
    # so compare in RAS: same voxel centres and values, same segment membership).
    expected = expected_labels(volume, centre, radius)
    ras_original = voxel_ras(volume).reshape(3, -1).T
    ras_loaded = voxel_ras(loaded_volume).reshape(3, -1).T
    order_o = np.lexsort(np.round(ras_original, 4).T)
    order_l = np.lexsort(np.round(ras_loaded, 4).T)
    np.testing.assert_allclose(ras_original[order_o], ras_loaded[order_l], atol=1e-4)
    liver_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("liver")
    liver_loaded = segment_array(loaded, liver_id, loaded_volume).ravel()[order_l]
    np.testing.assert_array_equal(liver_loaded, (expected == 5).astype(np.uint8).ravel()[order_o])
    values_loaded = np.array(scene_io.volume_array(loaded_volume)).ravel()[order_l]
    np.testing.assert_array_equal(values_loaded, np.array(scene_io.volume_array(volume)).ravel()[order_o])
    other.Clear(1)


def test_overwrite_keeps_an_undo_copy(scene, fake_model):
    volume = make_volume(scene)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My edits")
    existing.CreateDefaultDisplayNodes()
    existing.GetSegmentation().AddEmptySegment("tumour", "tumour")
    existing_id = existing.GetID()
    ids_before = scene_state(scene)["ids"]
    undo = scene_io.UndoStore()
    job = SegmentJob(scene, SegmentRequest(volume, fake_model, existing), fake_launcher("ok"), undo=undo)
    job.start().wait(60)
    assert job.state is JobState.SUCCEEDED, job.error_message
    assert job.result_node is existing and existing.GetID() == existing_id and existing.GetName() == "My edits"
    assert scene_io.segment_names(existing) == [c.name for c in SYNAPSE_ORGANS.classes]
    assert scene_state(scene)["ids"] == ids_before  # no new node
    assert visible_segments(existing) == [c.name for c in SYNAPSE_ORGANS.classes]
    assert undo.can_restore(existing)
    assert undo.restore(existing)
    assert scene_io.segment_names(existing) == ["tumour"] and visible_segments(existing) == ["tumour"]
    assert not undo.can_restore(existing)


def visible_segments(node):
    ids = vtk.vtkStringArray()
    node.GetDisplayNode().GetVisibleSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


@pytest.mark.parametrize("mode, message", [
    ("badgrid", "not on the input volume's voxel grid"),
    ("badlabels", "label values [42] are not in the label set"),
])
def test_a_result_that_cannot_be_imported_leaves_the_scene_unchanged(scene, fake_model, mode, message):
    volume = make_volume(scene)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Existing")
    existing.GetSegmentation().AddEmptySegment("kept", "kept")
    for output in (None, existing):
        before = scene_state(scene, volume)
        job = run_fake(scene, volume, fake_model, mode, output=output)
        assert job.state is JobState.FAILED
        assert message in job.error_message and "Traceback" not in job.error_message
        assert scene_state(scene, volume) == before


# ---------------------------------------------------------------------------------------------- input checks

def test_input_checks_refuse_bad_volumes_readably(scene):
    with pytest.raises(SegmentInputError, match="Select an input volume"):
        scene_io.check_input_volume(None)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(SegmentInputError, match="is a label map"):
        scene_io.check_input_volume(labelmap)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(SegmentInputError, match="has no image data"):
        scene_io.check_input_volume(empty)
    flat = make_volume(scene, dims=(16, 12, 1), name="single slice")
    with pytest.raises(SegmentInputError, match=r"is 2D \(16×12×1 voxels\)"):
        scene_io.check_input_volume(flat)
    rgb = slicer.vtkMRMLVectorVolumeNode()
    rgb.SetName("photo")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    scene.AddNode(rgb)
    with pytest.raises(SegmentInputError, match="vector/RGB volume"):
        scene_io.check_input_volume(rgb)
    multi = make_volume(scene, name="two components")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_SHORT, 2)
    multi.SetAndObserveImageData(image)
    with pytest.raises(SegmentInputError, match="2 components"):
        scene_io.check_input_volume(multi)


def test_a_frame_of_a_4d_sequence_is_refused(scene):
    frame = make_volume(scene, name="cine frame")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(frame, sequence, False)
    assert browser.IsProxyNodeID(frame.GetID())
    with pytest.raises(SegmentInputError, match="one frame of the 4D sequence 'cine browser'"):
        scene_io.check_input_volume(frame)


def test_output_under_another_transform_is_refused(scene):
    volume = make_volume(scene)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    output.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(SegmentInputError, match="under different transforms"):
        scene_io.check_output_segmentation(output, volume)
    with pytest.raises(SegmentInputError, match="is not a segmentation"):
        scene_io.check_output_segmentation(volume, volume)


def test_build_segmentation_handles_gaps_in_label_values(scene):
    from hsam.data.labels import LabelClass, LabelSet

    volume = make_volume(scene, dims=(6, 5, 4))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, 0] = 3
    labels[1, 1, 1] = 7
    label_set = LabelSet("gappy", (LabelClass(3, "three", (10, 20, 30)), LabelClass(7, "seven", (200, 100, 0))))
    node = scene_io.build_segmentation(labels, label_set, volume, name="gaps")
    assert node.GetScene() is None  # built outside the scene
    assert scene_io.segment_names(node) == ["three", "seven"]
    scene.AddNode(node)
    assert segment_array(node, "three", volume)[0, 0, 0] == 1 and segment_array(node, "three", volume).sum() == 1
    assert segment_array(node, "seven", volume)[1, 1, 1] == 1 and segment_array(node, "seven", volume).sum() == 1
    with pytest.raises(ImportResultError, match="does not match its label set"):
        labels[2, 2, 2] = 4
        scene_io.build_segmentation(labels, label_set, volume)


def test_export_writes_the_nodes_own_grid(scene, tmp_path):
    import SimpleITK as sitk

    volume = make_volume(scene, ijk_to_ras=oblique_matrix(flips=(1, 1, -1)))
    path = scene_io.export_volume(volume, tmp_path / "in.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), scene_io.volume_array(volume))
    # Physical position of voxel (i, j, k) according to the file equals the node's IJK→RAS.
    for index in [(0, 0, 0), (5, 3, 2), (17, 13, 8)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = (scene_io.ijk_to_ras(volume) @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-6)
