"""Helpers of the HSAMSegment module tests: a real MRML scene (PyPI ``slicer-core``) set up with the logics the
desktop application would give a module, test volumes and geometry, the module folder on ``sys.path``, the fake
and the real worker launchers.

To run the module against the real worker instead of the fake one, use ``real_launcher()`` in place of
``fake_launcher(...)`` (``WorkerLauncher()`` instead of ``WorkerLauncher(script=FAKE_WORKER, ...)``).

(This folder is deliberately not called ``slicer``: slicer-core's ``slicer`` package adopts every folder named
``slicer`` on ``sys.path`` and imports each ``.py`` in it.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "HSAMSegment"
FAKE_WORKER = Path(__file__).resolve().with_name("fake_worker.py")

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

_RULES_REGISTERED = False


def _register_converter_rules(slicer) -> None:
    """What the Segmentations module does at startup: the labelmap ↔ closed surface conversions."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())
    _RULES_REGISTERED = True


def new_scene(folder: Path):
    """A scene with the application, colour, segmentations, volumes, subject-hierarchy and sequences logics and a
    data I/O manager (needed to read .mrb files), as the desktop application sets up."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    (folder / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
    (folder / "tmp").mkdir(exist_ok=True)
    app.SetHomeDirectory(str(folder))
    app.SetShareDirectory("share")
    app.SetTemporaryPath(str(folder / "tmp"))
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(folder / "tmp"))
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    app.SetMRMLScene(scene)
    color = slicer.vtkSlicerColorLogic()
    color.SetMRMLApplicationLogic(app)
    color.SetMRMLScene(scene)
    app.SetColorLogic(color)
    logics = [color, cache, io]
    for name, cls in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Sequences", slicer.vtkSlicerSequencesLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics.append(logic)
    _register_converter_rules(slicer)
    _KEEP_ALIVE[id(scene)] = (app, logics)
    return scene


_KEEP_ALIVE: dict = {}  # the logics live as long as their scene


def release_scene(scene) -> None:
    scene.Clear(1)
    _KEEP_ALIVE.pop(id(scene), None)


def make_volume(scene, dims=(20, 16, 10), ijk_to_ras=None, name="CT", array=None, in_study=True):
    """A scalar volume with an asymmetric intensity pattern (each voxel distinct enough to catch any flip).
    ``dims`` is (i, j, k). Placed in a patient/study of the subject hierarchy when ``in_study``."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    ni, nj, nk = dims
    if array is None:
        k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        array = ((i * 7 + j * 31 + k * 101) % 997 - 600).astype(np.int16)  # all below 500
        array[(i == 1) & (j == 2)] = 900  # a bony line near one corner (label 1 of the fake worker)
    image = vtk.vtkImageData()
    image.SetDimensions(ni, nj, nk)
    vtk_type = numpy_support.get_vtk_array_type(array.dtype)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                                               array_type=vtk_type))
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    node.SetAndObserveImageData(image)
    if ijk_to_ras is not None:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, float)))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    if in_study:
        sh = scene.GetSubjectHierarchyNode()
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
        study = sh.CreateStudyItem(patient, "Study 1")
        sh.CreateItem(study, node)
    return node


def oblique_matrix(spacing=(0.7, 0.9, 2.5), angles=(0.3, -0.2, 0.5), flips=(1, 1, 1), origin=(-12.5, 30.0, 7.25)):
    """IJK→RAS with rotation, per-axis flips (a single flip makes it left-handed) and anisotropic spacing."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(np.array(flips, float) * np.array(spacing, float))
    m[:3, 3] = origin
    return m


def fake_launcher(mode="ok", **env):
    """The worker launcher with the fake worker script (same command line and protocol as hsam.worker)."""
    from HSAMSegmentLib.process import WorkerLauncher

    extra = {"FAKE_WORKER_MODE": mode}
    extra.update({k: str(v) for k, v in env.items()})
    return WorkerLauncher(python=sys.executable, script=str(FAKE_WORKER), extra_env=extra)


def real_launcher():
    from HSAMSegmentLib.process import WorkerLauncher

    return WorkerLauncher(python=sys.executable)


def segment_array(segmentation_node, segment_id, reference_volume):
    """One segment as a 0/1 array (k, j, i) on ``reference_volume``'s voxel grid (Slicer's own export)."""
    import slicer
    import vtk

    from HSAMSegmentLib.scene_io import volume_array

    scene = reference_volume.GetScene()
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        assert ok, f"export of segment {segment_id} failed"
        return (np.array(volume_array(labelmap)) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def voxel_ras(volume):
    """RAS coordinates of every voxel centre, shape (3, k, j, i), from the node's IJK→RAS matrix."""
    from HSAMSegmentLib.scene_io import ijk_to_ras

    ni, nj, nk = volume.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(float)
    return (ijk_to_ras(volume) @ ijk1)[:3].reshape(3, nk, nj, ni)
