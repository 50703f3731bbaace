"""Building blocks of the module's self-test (``HSAMSegmentTest``), also used by the pytest suite.

Offline by design: the input is a synthetic CT-like volume and the model a tiny randomly initialised H-SAM written
with the core (the segmentation is meaningless, but names, colours, geometry, cancel and the whole path through
the real worker are exercised).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

TINY_MODEL_NAME = "hsam-tiny-selftest"


def add_ct_like_volume(scene: Any, name: str = "HSAM synthetic CT", dims: tuple[int, int, int] = (40, 36, 12),
                       ijk_to_ras: np.ndarray | None = None) -> Any:
    """Add a small CT-like scalar volume (HU, int16): air, a body ellipse, a brighter organ blob on one side
    and a bony "spine" behind. ``dims`` is (i, j, k); ``ijk_to_ras`` a 4×4 matrix (default: 0.9×0.8×2.5 mm, LPS
    axes as DICOM CT usually has)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    ni, nj, nk = dims
    k, j, i = np.meshgrid(np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij")
    array = np.full((nk, nj, ni), -1000, dtype=np.int16)
    body = (i / 0.9) ** 2 + (j / 0.75) ** 2 < 1
    array[body] = 40
    organ = ((i + 0.4) / 0.3) ** 2 + ((j + 0.1) / 0.3) ** 2 + (k / 0.9) ** 2 < 1
    array[organ & body] = 90
    spine = (i / 0.15) ** 2 + ((j - 0.5) / 0.15) ** 2 < 1
    array[spine] = 700
    array += ((i * 7 + j * 13 + k * 3) * 3).astype(np.int16)  # a gentle ramp: no two slices alike

    image = vtk.vtkImageData()
    image.SetDimensions(ni, nj, nk)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                                               array_type=vtk.VTK_SHORT))
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetAndObserveImageData(image)
    if ijk_to_ras is None:
        ijk_to_ras = np.array([[-0.9, 0, 0, 18.0], [0, -0.8, 0, 14.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r][c]))
    node.SetIJKToRASMatrix(matrix)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def scene_state(scene: Any, volume: Any | None = None) -> dict:
    """What must not change when a run fails or is cancelled: the nodes (IDs) and the input's voxels/geometry."""
    ids = sorted(scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes()))
    state: dict = {"count": len(ids), "ids": ids}
    if volume is not None and volume.GetImageData() is not None:
        from .scene_io import ijk_to_ras, volume_array

        state["voxels"] = hashlib.sha256(np.ascontiguousarray(volume_array(volume)).tobytes()).hexdigest()
        state["ijk_to_ras"] = ijk_to_ras(volume).round(9).tolist()
        state["volume_mtime"] = volume.GetImageData().GetMTime()
    segmentations = [scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
                     for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    state["segments"] = {s.GetID(): [s.GetSegmentation().GetNthSegmentID(n)
                                     for n in range(s.GetSegmentation().GetNumberOfSegments())]
                         for s in segmentations}
    return state


def write_tiny_model(path: str | Path) -> Path:
    """A tiny randomly initialised H-SAM model file (our safetensors format) for offline tests. Needs torch."""
    import torch

    from hsam.data.labels import SYNAPSE_ORGANS
    from hsam.description import ModelDescription, sam_vit_architecture
    from hsam.model.build import build_from_description
    from hsam.weights.modelfile import save_model_file

    decoder = {"transformer_dim": 32, "transformer_depth": 1, "num_heads": 2, "mlp_dim": 64,
               "upscale_channels": [16, 8], "pixel_decoder_channels": [8, 8]}
    architecture = sam_vit_architecture("vit_b", image_size=64, lora_rank=2, embed_dim=32, depth=2, num_heads=2,
                                        global_attn_indexes=[1], window_size=2, out_chans=32, decoder=decoder)
    description = ModelDescription(name=TINY_MODEL_NAME, title="Tiny self-test model (random weights)",
                                   architecture=architecture, labels=SYNAPSE_ORGANS,
                                   provenance={"purpose": "HSAMSegment self-test; not a trained model"})
    torch.manual_seed(0)
    model = build_from_description(description)
    return save_model_file(Path(path), model.state_dict(), description)


def segmentation_labels(segmentation_node: Any, volume: Any) -> np.ndarray:
    """The segmentation exported back to a label map on ``volume``'s grid (k, j, i), values = segment order."""
    import slicer

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene = segmentation_node.GetScene()
    scene.AddNode(labelmap)
    try:
        segmentation = segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                    volume)
        if not ok:
            raise RuntimeError("export of the segmentation failed")
        from .scene_io import volume_array

        return np.array(volume_array(labelmap))
    finally:
        scene.RemoveNode(labelmap)


def tiny_model_choice(folder: str | Path):
    """The tiny model written into ``folder``, as a model-list entry."""
    from .models import ModelChoice

    path = write_tiny_model(Path(folder) / f"{TINY_MODEL_NAME}.safetensors")
    return ModelChoice(id="file:" + str(path), title="Tiny self-test model", source="file", checkpoint=str(path))


# ---------------------------------------------------------------------------------------------- checks
# ``case`` is a unittest.TestCase (HSAMSegmentTest in Slicer, a plain one under pytest); ``logic`` a
# HSAMSegmentLogic; ``scene`` the scene it works on.

def _say(case: Any, text: str) -> None:
    getattr(case, "delayDisplay", print)(text)


def check_bad_inputs(case: Any, logic: Any, scene: Any) -> None:
    """No volume, a 2D volume, a label map: refused with readable messages, scene unchanged."""
    from .errors import SegmentInputError
    from .models import ModelChoice

    _say(case, "Bad inputs are refused before the scene changes")
    model = ModelChoice(id="unused", title="unused", source="file", checkpoint="unused.safetensors")
    with case.assertRaises(SegmentInputError):
        logic.segment(None, model)
    flat = add_ct_like_volume(scene, "single slice", dims=(16, 16, 1))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")
    before = scene_state(scene, flat)
    for volume, words in ((flat, "is 2D"), (labelmap, "is a label map")):
        with case.assertRaises(SegmentInputError) as raised:
            logic.segment(volume, model)
        case.assertIn(words, str(raised.exception))
    case.assertEqual(scene_state(scene, flat), before)


def check_segment_and_cancel(case: Any, logic: Any, scene: Any, model: Any, timeout: float = 900) -> None:
    """End to end: segments, names, colours, geometry; then a cancelled run leaves the scene unchanged."""
    from .run import JobState
    from .scene_io import ijk_to_ras, segment_names, volume_array

    _say(case, "Segmenting a synthetic CT in the background worker")
    volume = add_ct_like_volume(scene)
    before = scene_state(scene, volume)
    job = logic.segment(volume, model, device="cpu", wait=True, timeout=timeout)
    case.assertEqual(job.state, JobState.SUCCEEDED)
    node = job.result_node
    names = segment_names(node)
    case.assertGreater(len(names), 0)
    case.assertEqual(len(set(names)), len(names))
    for index in range(node.GetSegmentation().GetNumberOfSegments()):
        segment = node.GetSegmentation().GetNthSegment(index)
        case.assertTrue(segment.GetTerminology().startswith("Segmentation category and type"))
        case.assertNotEqual(tuple(segment.GetColor()), (0.5, 0.5, 0.5))
    case.assertEqual(segmentation_labels(node, volume).shape, volume_array(volume).shape)
    import slicer

    key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    case.assertTrue(node.GetSegmentation().GetConversionParameter(key), "the segmentation has no reference geometry")
    after = scene_state(scene, volume)
    case.assertEqual(after["voxels"], before["voxels"])
    case.assertEqual(after["ijk_to_ras"], ijk_to_ras(volume).round(9).tolist())
    case.assertTrue(set(before["ids"]) < set(after["ids"]) and node.GetID() in after["ids"])

    _say(case, "Cancel leaves the scene unchanged")
    before = scene_state(scene, volume)
    job = logic.segment(volume, model, device="cpu")
    job.poll()
    job.cancel()
    case.assertEqual(job.state, JobState.CANCELLED)
    case.assertEqual(scene_state(scene, volume), before)
    _say(case, "Self-test passed")


def replace_segment_contents(segmentation_node: Any, volume: Any, labels: np.ndarray, label_set: Any) -> None:
    """What a Segment Editor edit does: the contents of the segments named by ``label_set`` replaced by ``labels``
    ((k, j, i) on ``volume``'s grid); segment IDs, names and tags are kept."""
    import slicer
    import vtk

    from .scene_io import _quiet_vtk, labelmap_node_from_array

    ids = vtk.vtkStringArray()
    by_value = {c.value: c for c in label_set.classes}
    segmentation = segmentation_node.GetSegmentation()
    for value in range(1, max(by_value) + 1):
        cls = by_value.get(value)
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(cls.name) if cls else "")
    with _quiet_vtk():
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap_node_from_array(labels, volume), segmentation_node, ids)
    if not ok:
        raise RuntimeError("could not edit the segments")


def check_finetune_flow(case: Any, logic: Any, scene: Any, model: Any, timeout: float = 600) -> None:
    """Segment → correct two slices → Propose finds them → Fine-tune (fast, CPU) → the new model is listed and the
    base file unchanged → segment again with it into a new segmentation. The new model file is deleted at the end
    (it would otherwise stay in the user's model list)."""
    import hashlib

    from .run import JobState
    from .scene_io import segment_names

    _say(case, "Fine-tuning from corrected slices")
    base_file = Path(model.checkpoint)
    base_hash = hashlib.sha256(base_file.read_bytes()).hexdigest()
    volume = add_ct_like_volume(scene, "HSAM fine-tune CT", dims=(48, 48, 8))
    first = logic.segment(volume, model, device="cpu", show3D=False, wait=True, timeout=timeout).result_node
    case.assertEqual(logic.proposeCorrectedSlices(volume, first)[0], [])
    prediction = logic.predictions.get(first)
    corrected = prediction.labels.copy()
    liver = next(c.value for c in prediction.label_set.classes if c.name == "liver")
    corrected[2], corrected[5] = 0, 0
    corrected[2, 10:30, 12:36] = liver  # drawn on two slices
    corrected[5, 14:34, 10:30] = liver
    replace_segment_contents(first, volume, corrected, prediction.label_set)
    slices, why = logic.proposeCorrectedSlices(volume, first)
    case.assertEqual(slices, [2, 5], why)
    before = scene_state(scene, volume)
    job = logic.finetune(volume, first, slices, model, mode="fast", epochs=2, device="cpu", wait=True, timeout=timeout)
    try:
        case.assertEqual(job.state, JobState.SUCCEEDED)
        case.assertEqual(scene_state(scene, volume), before)  # fine-tuning does not touch the scene
        case.assertTrue(job.model_path.is_file())
        case.assertEqual(hashlib.sha256(base_file.read_bytes()).hexdigest(), base_hash)
        listed = [c for c in logic.modelChoices()[0] if c.checkpoint == str(job.model_path)]
        case.assertEqual(len(listed), 1)
        case.assertTrue(listed[0].usable and "fine-tuned" in listed[0].title, listed[0])
        case.assertEqual(logic.modelIdOfFile(job.model_path), listed[0].id)
        second = logic.segment(volume, listed[0], device="cpu", show3D=False, wait=True, timeout=timeout).result_node
        case.assertIsNot(second, first)
        case.assertEqual(segment_names(second), [c.name for c in prediction.label_set.classes])
        _say(case, "Segmenting again, guided by the corrected slices")
        third = logic.segment(volume, listed[0], device="cpu", show3D=False, wait=True, timeout=timeout,
                              guideLabels=job.labels, guideSlices=job.request.slices).result_node
        from .finetune import training_labels

        guided = training_labels(third, volume)[0]
        for k in slices:  # the corrected slices keep their labels exactly
            case.assertTrue(np.array_equal(guided[k], corrected[k]), f"slice {k} changed")
        case.assertEqual(third.GetAttribute("HSAM.GuidedBySlices"), ",".join(str(k) for k in slices))
    finally:
        if job.model_path is not None:
            job.model_path.unlink(missing_ok=True)
    _say(case, "Fine-tuning self-test passed")


def check_sample_ct_online(case: Any, logic: Any) -> None:
    """The first registry model on Slicer's abdominal CTA sample; only when online with PyTorch installed."""
    import urllib.request

    from .install import torch_missing

    try:
        urllib.request.urlopen("https://github.com", timeout=5)
    except OSError:
        _say(case, "Offline: the sample-CT test is skipped")
        return
    choices, _problem = logic.modelChoices()
    model = next((c for c in choices if c.source == "registry" and c.usable), None)
    if model is None or torch_missing():
        _say(case, "No registry model or no PyTorch: the sample-CT test is skipped")
        return
    import SampleData

    volume = SampleData.downloadSample("CTAAbdomenPanoramix")
    job = logic.segment(volume, model, wait=True, timeout=3600)
    case.assertGreater(job.result_node.GetSegmentation().GetNumberOfSegments(), 0)
    _say(case, "Sample CT segmented")
