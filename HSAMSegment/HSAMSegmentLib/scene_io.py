"""Scene I/O: input volume → NRRD file for the worker; the worker's label map → a segmentation node.

Rules kept here:

* the input volume is only read, never modified;
* every check that can fail runs before the scene changes (:func:`check_input_volume`,
  :func:`check_output_segmentation`);
* the result is built in a segmentation node that is not in any scene yet and is added (or copied into the
  chosen output node) only once it is complete, so a failure leaves the scene exactly as it was;
* overwriting an existing segmentation first keeps a copy of its segments (:class:`UndoStore`).

Geometry: the worker gets the volume's own voxel grid (array in k, j, i order, IJK→RAS written as the NRRD's
LPS space directions/origin) and must return a label map on that same grid; :func:`read_label_map` checks
that, and the label map node then takes the input volume's IJK→RAS matrix exactly, so segments are aligned
voxel for voxel (oblique, flipped and left-handed grids included).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hsam.data.labels import LabelSet
from hsam.errors import DiskFullError, HSAMError

from .errors import ImportResultError, SegmentInputError

GEOMETRY_TOLERANCE = 1e-4  # mm (and direction cosines) when comparing the worker's grid with the input's
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
ATTRIBUTE_PREFIX = "HSAM."


# ---------------------------------------------------------------------------------------------- helpers

def _slicer():
    import slicer

    return slicer


def _vtk():
    import vtk

    return vtk


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The node's IJK→RAS matrix (4×4) as a numpy array."""
    matrix = _vtk().vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray):
    matrix = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_label(node: Any) -> str:
    return f"'{node.GetName()}'" if node is not None and node.GetName() else "the selected node"


def _size_text(dims: Iterable[int]) -> str:
    return "×".join(str(int(d)) for d in dims)


# ---------------------------------------------------------------------------------------------- checks

def sequence_browser_of(volume_node: Any) -> Any | None:
    """The sequence browser whose proxy (current frame) this volume is, or None."""
    scene = volume_node.GetScene()
    if scene is None:
        return None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser is not None and browser.IsProxyNodeID(volume_node.GetID()):
            return browser
    return None


def check_input_volume(volume_node: Any) -> None:
    """Raise :class:`SegmentInputError` with a readable message if the volume cannot be segmented."""
    if volume_node is None:
        raise SegmentInputError("Select an input volume first (a CT or MR image, e.g. loaded with File > Add Data).")
    label = node_label(volume_node)
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise SegmentInputError(f"{label} is a label map, not an image; select the CT/MR image volume instead.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise SegmentInputError(f"{label} is a {volume_node.GetClassName()}, not a scalar image volume; "
                                "select a CT or MR image volume.")
    image = volume_node.GetImageData()
    components = image.GetNumberOfScalarComponents() if image is not None else 1
    if volume_node.IsA("vtkMRMLVectorVolumeNode") or components > 1:
        raise SegmentInputError(
            f"{label} is a vector/RGB volume ({components} components per voxel); H-SAM segments single-channel "
            "CT/MR images. Convert it first (Vector to Scalar Volume module) or select another volume.")
    if volume_node.IsA("vtkMRMLTensorVolumeNode"):  # diffusion tensor/weighted volumes
        raise SegmentInputError(f"{label} is a diffusion (tensor) volume; H-SAM segments scalar CT/MR images.")
    if image is None:
        raise SegmentInputError(f"{label} has no image data (it may still be loading or failed to load); "
                                "reload it and try again.")
    browser = sequence_browser_of(volume_node)
    if browser is not None:
        raise SegmentInputError(
            f"{label} is one frame of the 4D sequence '{browser.GetName()}'; H-SAM segments one 3D volume at a "
            "time. Copy the frame you want into its own volume (Sequences module, or right-click > Clone in "
            "Data) and segment that copy.")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise SegmentInputError(
            f"{label} is 2D ({_size_text(dims)} voxels); H-SAM segments 3D volumes. Load the whole image series "
            "(all slices) instead of a single image.")
    matrix = ijk_to_ras(volume_node)[:3, :3]
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-12:
        raise SegmentInputError(f"{label} has an invalid geometry (zero spacing or degenerate axes); "
                                "check its spacing and directions in the Volumes module.")


def check_output_segmentation(segmentation_node: Any, volume_node: Any) -> None:
    """An existing output segmentation must be a segmentation node in the volume's coordinate system."""
    if segmentation_node is None:
        return
    if not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise SegmentInputError(f"{node_label(segmentation_node)} is not a segmentation; choose a segmentation "
                                "node or 'Create new segmentation' as output.")
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise SegmentInputError(
            f"the output segmentation {node_label(segmentation_node)} and the input volume "
            f"{node_label(volume_node)} are under different transforms, so the result would be misplaced; "
            "choose 'Create new segmentation' or move both under the same transform (Data module).")


def check_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Raise :class:`DiskFullError` if ``folder`` has less than ``needed_bytes`` free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed_bytes:
        raise DiskFullError(f"not enough free disk space in {folder} for {what}: {needed_bytes / 2**20:.0f} MB "
                            f"needed, {free / 2**20:.0f} MB free. Free some space (or set the temporary folder "
                            "to a larger disk in Application Settings) and try again.")


# ---------------------------------------------------------------------------------------------- export

def volume_array(volume_node: Any) -> np.ndarray:
    """A read-only view of the voxels in k, j, i order (no copy; the node is not modified)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    view = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    view.flags.writeable = False
    return view


def sitk_geometry(matrix: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in SimpleITK's LPS convention from an IJK→RAS matrix."""
    lps = RAS_TO_LPS @ matrix[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = RAS_TO_LPS @ matrix[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(float(d) for d in
                                                                                   direction.flatten())


def export_volume(volume_node: Any, path: str | Path) -> Path:
    """Write the volume to an (uncompressed) NRRD file on its own voxel grid, for the worker to read."""
    array = volume_array(volume_node)
    return write_on_volume_grid(array, volume_node, path, "the input volume", compress=False)


def write_on_volume_grid(array: np.ndarray, volume_node: Any, path: str | Path, what: str,
                         compress: bool = True) -> Path:
    """Write ``array`` (k, j, i) as an image file with ``volume_node``'s geometry (for the worker to read); the
    array is copied, so a node's memory is never touched. Checks the free space first."""
    import SimpleITK as sitk

    path = Path(path)
    check_free_space(path.parent, int(array.nbytes * 1.05) + (1 << 20), f"a temporary copy of {what}")
    image = sitk.GetImageFromArray(array)
    spacing, origin, direction = sitk_geometry(ijk_to_ras(volume_node))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as exc:
        raise HSAMError(f"could not write {what} to the temporary file {path}: "
                        f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from exc
    return path


# ---------------------------------------------------------------------------------------------- import

def read_label_map(path: str | Path, volume_node: Any) -> np.ndarray:
    """The worker's label map as a uint8 array (k, j, i), after checking it lies on the input's voxel grid."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ImportResultError(f"the worker reported success but wrote no label map ({path} is missing)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImportResultError(f"the worker's label map {path.name} cannot be read: "
                                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImportResultError(f"the worker's label map has {image.GetNumberOfComponentsPerPixel()} components "
                                "per voxel instead of 1")
    dims = volume_node.GetImageData().GetDimensions()
    if tuple(image.GetSize()) != tuple(dims):
        raise ImportResultError(f"the worker's label map has {_size_text(image.GetSize())} voxels but the input "
                                f"volume has {_size_text(dims)}; this is a bug in the worker, please report it")
    spacing, origin, direction = sitk_geometry(ijk_to_ras(volume_node))
    problems = []
    for name, got, want in (("spacing", image.GetSpacing(), spacing), ("origin", image.GetOrigin(), origin),
                            ("directions", image.GetDirection(), direction)):
        if not np.allclose(got, want, atol=GEOMETRY_TOLERANCE, rtol=1e-6):
            problems.append(f"{name} {tuple(round(g, 5) for g in got)} instead of {tuple(round(w, 5) for w in want)}")
    if problems:
        raise ImportResultError("the worker's label map is not on the input volume's voxel grid ("
                                + "; ".join(problems) + "); this is a bug in the worker, please report it")
    array = sitk.GetArrayFromImage(image)
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255 or not np.issubdtype(array.dtype, np.integer)):
            raise ImportResultError(f"the worker's label map holds values outside 0..255 ({array.dtype})")
        array = array.astype(np.uint8)
    return array


def labelmap_node_from_array(labels: np.ndarray, volume_node: Any):
    """A label map volume node (not in any scene) holding ``labels`` on the volume's exact geometry."""
    slicer = _slicer()
    vtk = _vtk()
    from vtk.util import numpy_support

    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    scalars = numpy_support.numpy_to_vtk(labels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    return node


@contextmanager
def _quiet_vtk():
    """Silence VTK's warning display for one call (building a node outside the scene makes
    ``ImportLabelmapToSegmentationNode`` complain that it cannot create display nodes yet)."""
    vtk = _vtk()
    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)


def build_segmentation(labels: np.ndarray, label_set: LabelSet, volume_node: Any, name: str = "",
                       attributes: dict[str, str] | None = None):
    """A complete segmentation node (not in any scene): one segment per class of ``label_set``, in label-value
    order, with the model's names, colours (0..1) and terminology; reference geometry = ``volume_node``."""
    slicer = _slicer()
    vtk = _vtk()
    present = np.unique(labels)
    try:
        label_set.check_values(present)
    except HSAMError as exc:
        raise ImportResultError(f"the worker's label map does not match its label set: {exc}") from exc

    labelmap = labelmap_node_from_array(labels, volume_node)
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    segmentation_node.SetName(name)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    # updatedSegmentIDs: entry v-1 receives label value v; empty entries skip values the set does not use.
    ids = vtk.vtkStringArray()
    by_value = {c.value: c for c in label_set.classes}
    segment_ids: dict[int, str] = {}
    used: set[str] = set()
    for value in range(1, max(by_value) + 1):
        cls = by_value.get(value)
        if cls is None:
            ids.InsertNextValue("")
            continue
        segment_id = _unique_id(cls.name, used)
        segment_ids[value] = segment_id
        ids.InsertNextValue(segment_id)
    with _quiet_vtk():
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node,
                                                                                      ids)
    if not ok:
        raise ImportResultError("Slicer could not import the worker's label map into a segmentation")
    segmentation = segmentation_node.GetSegmentation()
    for value, segment_id in segment_ids.items():
        cls = by_value[value]
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise ImportResultError(f"segment {cls.name!r} is missing after the import")
        segment.SetName(cls.name)
        segment.SetColor(*(c / 255.0 for c in cls.color))
        if cls.terminology is not None:
            segment.SetTag(segment.GetTerminologyEntryTagName(), cls.terminology.to_slicer_tag())
        segment.SetTag(ATTRIBUTE_PREFIX + "LabelValue", str(value))
    for key, value in (attributes or {}).items():
        segmentation_node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
    return segmentation_node


def _unique_id(name: str, used: set[str]) -> str:
    base = name.strip() or "segment"
    candidate, n = base, 2
    while candidate in used:
        candidate, n = f"{base}_{n}", n + 1
    used.add(candidate)
    return candidate


def segment_names(segmentation_node: Any) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


# ---------------------------------------------------------------------------------------------- scene

def unique_name(scene: Any, base: str) -> str:
    return scene.GenerateUniqueName(base) if scene is not None else base


def place_in_study(scene: Any, node: Any, volume_node: Any) -> None:
    """Put ``node`` next to ``volume_node`` in the subject hierarchy (its study/folder), so DICOM SEG export
    finds the right patient and study."""
    sh = scene.GetSubjectHierarchyNode() if scene is not None else None
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = sh.GetItemParent(volume_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def show_result(segmentation_node: Any, show3d: bool) -> None:
    """Display settings after the node is in the scene (display nodes need a scene)."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility3D(bool(show3d))
        if show3d:
            display.SetPreferredDisplayRepresentationName3D("Closed surface")


def add_new_segmentation(scene: Any, built: Any, volume_node: Any, show3d: bool) -> Any:
    """Add a fully built segmentation node to the scene as a new node; return it."""
    built.SetName(unique_name(scene, built.GetName() or f"{volume_node.GetName()} organs"))
    scene.AddNode(built)
    try:
        built.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        show_result(built, show3d)
        place_in_study(scene, built, volume_node)
    except Exception:
        scene.RemoveNode(built)
        raise
    return built


class UndoStore:
    """Copies of segmentations taken before a run overwrote them (the last one per node)."""

    def __init__(self) -> None:
        self._saved: dict[str, tuple[Any, Any]] = {}  # node ID -> (node, copy of its segmentation)

    def save(self, segmentation_node: Any) -> None:
        copy = _slicer().vtkSegmentation()
        copy.DeepCopy(segmentation_node.GetSegmentation())
        self._saved[segmentation_node.GetID()] = (segmentation_node, copy)
        scene = segmentation_node.GetScene()
        if scene is not None and scene.GetUndoFlag():
            scene.SaveStateForUndo()  # Slicer's own scene undo, where the user has turned it on

    def _entry(self, segmentation_node: Any) -> tuple[Any, Any] | None:
        if segmentation_node is None:
            return None
        entry = self._saved.get(segmentation_node.GetID())
        return entry if entry is not None and entry[0] is segmentation_node else None

    def can_restore(self, segmentation_node: Any) -> bool:
        return self._entry(segmentation_node) is not None

    def restore(self, segmentation_node: Any) -> bool:
        """Put back the segments saved before the last overwrite of this node; False if none were saved."""
        entry = self._entry(segmentation_node)
        if entry is None:
            return False
        del self._saved[segmentation_node.GetID()]
        _replace_segments(segmentation_node, entry[1])
        return True

    def clear(self) -> None:
        """Forget everything (the scene is being closed)."""
        self._saved.clear()


def _replace_segments(segmentation_node: Any, source_segmentation: Any) -> None:
    """Make ``segmentation_node`` hold exactly the segments of ``source_segmentation`` (copied)."""
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation.DeepCopy(source_segmentation)
    finally:
        segmentation_node.EndModify(was_modifying)
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.Modified()


def overwrite_segmentation(target: Any, built: Any, volume_node: Any, show3d: bool, undo: UndoStore | None) -> Any:
    """Replace the segments of an existing node with those of ``built`` (a copy of the old ones is kept in
    ``undo`` first); the node keeps its name, ID, display and storage nodes and place in the hierarchy."""
    if undo is not None:
        undo.save(target)
    _replace_segments(target, built.GetSegmentation())
    target.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for key in _attribute_names(built):
        target.SetAttribute(key, built.GetAttribute(key))
    show_result(target, show3d)
    return target


def _attribute_names(node: Any) -> list[str]:
    names = node.GetAttributeNames()
    if names is None:
        return []
    if isinstance(names, (list, tuple)):
        return list(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


@dataclass
class ImportRequest:
    labels_path: Path
    label_set_json: dict
    volume_node: Any
    output_node: Any | None
    show3d: bool
    name: str = ""
    attributes: dict | None = None


def import_result(scene: Any, request: ImportRequest, undo: UndoStore | None = None, with_labels: bool = False):
    """Everything from the worker's files to the finished node in the scene; the scene is unchanged if any
    step fails (the node is built outside the scene first). Returns the node, or with ``with_labels`` the tuple
    (node, label map (k, j, i) uint8, LabelSet)."""
    try:
        label_set = LabelSet.from_json(request.label_set_json)
    except (KeyError, TypeError, ValueError) as exc:
        raise ImportResultError(f"the worker's label set is malformed ({exc}); this is a bug in the worker, "
                                "please report it") from exc
    labels = read_label_map(request.labels_path, request.volume_node)
    built = build_segmentation(labels, label_set, request.volume_node, name=request.name,
                               attributes=request.attributes)
    if request.show3d:
        with _quiet_vtk():
            built.CreateClosedSurfaceRepresentation()
    # Nothing above touched the scene; from here on only well-tested MRML calls run.
    if request.output_node is None:
        node = add_new_segmentation(scene, built, request.volume_node, request.show3d)
    else:
        node = overwrite_segmentation(request.output_node, built, request.volume_node, request.show3d, undo)
    return (node, labels, label_set) if with_labels else node
