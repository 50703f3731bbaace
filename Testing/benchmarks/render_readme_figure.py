#!/usr/bin/env python
"""Render the README's picture of a result: a segmentation's closed surfaces in 3D next to three slices of its
image with the segment outlines, one PNG, without a display and without the desktop Slicer.

    hsam demo --out hsam-demo                                  # ≈ 5 min on 2 CPU cores (see README)
    python Testing/benchmarks/render_readme_figure.py hsam-demo
    # = --seg hsam-demo/colin27_hsam_guided.seg.nrrd --image hsam-demo/colin27_t1.nii.gz
    #   --dice hsam-demo/dice.json --out Resources/Screenshots/colin27_result.png

Left: the segments' closed surfaces built the way Slicer builds them — the ``.seg.nrrd`` is read into an MRML
segmentation node by slicer-core's ``vtkMRMLSegmentationStorageNode`` and converted with
``CreateClosedSurfaceRepresentation`` (binary labelmap → closed surface: flying edges, smoothing factor 0.5) —
each in its segment colour, rendered by VTK with an offscreen render window. VTK chooses its GL route at run time;
a missing GL library crashes the process (e.g. ``vtkOSOpenGLRenderWindow`` without libOSMesa segfaults), so the
routes are first probed in a child process: the default window where ``$DISPLAY`` is set, then EGL (Debian
``libegl1`` + ``libegl-mesa0``, Mesa's llvmpipe without a GPU), then OSMesa (``libosmesa6``). Where none works the
same surfaces are decimated and drawn by matplotlib's 3D axes instead (``--backend matplotlib`` forces that).
Right: axial, coronal and sagittal slices of the image (radiological convention, as Slicer shows them) through
the segmentation, with filled outlines in the same colours, and a legend with the per-structure Dice when
``dice.json`` (written by ``hsam demo``) has the method of the segmentation file.

Options: ``--seg``, ``--image``, ``--dice`` override the files of the demo folder (``--dice ''``: none),
``--out`` the PNG, ``--size 1600x800`` its pixels, ``--backend auto|vtk|matplotlib``, ``--title`` the line above
the 3D view, ``--view`` the direction the 3D camera looks from (RAS, e.g. ``-1,0.15,0.3`` = from the left, a little
anterior and superior). Prints the GL route used.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "Resources" / "Screenshots" / "colin27_result.png"
DEMO_FILES = {"seg": "colin27_hsam_guided.seg.nrrd", "image": "colin27_t1.nii.gz", "dice": "dice.json"}
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")  # Debian mricron-data, if the demo folder lacks it
DEFAULT_VIEW = (-1.0, 0.15, 0.3)  # camera direction from the centre, RAS: from the left, a little anterior, above
VIEW_ANGLE = 20.0  # degrees, vertical
ZOOM = 0.82  # < 1: the bounding sphere is larger than the structures' silhouette
BACKGROUND = "#111418"
FOREGROUND = "#e8e8e8"
# demo file → the method's key in dice.json and its name on the figure
METHODS = {"colin27_hsam_guided": ("hsam-guided", "H-SAM fine-tuned, guided mode"),
           "colin27_hsam": ("hsam", "H-SAM fine-tuned, prompt-free mode"),
           "colin27_atlas": (None, "AAL atlas (reference)")}

# The probe a child process runs: an offscreen render of a red square must come back red.
_PROBE = """
import sys
from vtkmodules import vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL render window classes)
from vtkmodules.vtkFiltersSources import vtkPlaneSource
from vtkmodules.vtkRenderingCore import vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow, vtkWindowToImageFilter
from vtkmodules.util.numpy_support import vtk_to_numpy
source = vtkPlaneSource()
mapper = vtkPolyDataMapper(); mapper.SetInputConnection(source.GetOutputPort())
actor = vtkActor(); actor.SetMapper(mapper); actor.GetProperty().SetColor(1, 0, 0); actor.GetProperty().LightingOff()
renderer = vtkRenderer(); renderer.AddActor(actor); renderer.SetBackground(0, 0, 1)
window = vtkRenderWindow(); window.SetOffScreenRendering(1); window.SetSize(32, 32); window.AddRenderer(renderer)
window.Render()
grab = vtkWindowToImageFilter(); grab.SetInput(window); grab.Update()
pixels = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
centre = pixels.reshape(32, 32, -1)[16, 16]
print(window.GetClassName(), int(centre[0]), int(centre[2]))
sys.exit(0 if centre[0] > 200 and centre[2] < 50 else 3)
"""


@dataclass
class Segment:
    segment_id: str
    name: str
    color: tuple[float, float, float]  # 0..1
    surface: object = field(repr=False)  # vtkPolyData, RAS millimetres


# ------------------------------------------------------------------------------------------- GL route

def probe_gl(window_class: str | None, timeout: float = 60.0) -> str | None:
    """The render window class VTK gives for ``window_class`` (None: VTK's default choice) if an offscreen render
    works with it, else None. Runs in a child process, because a missing GL library can crash VTK."""
    env = dict(os.environ)
    env.pop("VTK_DEFAULT_OPENGL_WINDOW", None)
    if window_class:
        env["VTK_DEFAULT_OPENGL_WINDOW"] = window_class
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split()
    return words[0] if done.returncode == 0 and words else None


@functools.lru_cache(maxsize=None)
def find_gl_route() -> str | None:
    """Set ``VTK_DEFAULT_OPENGL_WINDOW`` for this process to the first route that renders (see the module
    docstring) and return the window class, or None where no route works. Probed once per process."""
    routes = ([None] if os.environ.get("DISPLAY") else []) + ["vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow"]
    for route in routes:
        found = probe_gl(route)
        if found:
            if route:
                os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = route
            else:
                os.environ.pop("VTK_DEFAULT_OPENGL_WINDOW", None)
            return found
    return None


# ------------------------------------------------------------------------------------------- surfaces

def _register_converter_rules(slicer) -> None:
    """What the Segmentations module does at startup: the labelmap ↔ closed surface conversion rules."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetName() for rule in factory.GetConverterRules()}  # the module tests may have registered them
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        instance = rule()
        if instance.GetName() not in have:
            factory.RegisterConverterRule(instance)


def closed_surfaces(seg_path: str | Path, smoothing: float = 0.5) -> list[Segment]:
    """The segments of a ``.seg.nrrd`` with their closed surfaces, as Slicer makes them (slicer-core)."""
    import slicer
    import vtk

    _register_converter_rules(slicer)
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(seg_path))
    if not storage.ReadData(node):
        raise RuntimeError(f"slicer-core could not read the segmentation {seg_path}")
    segmentation = node.GetSegmentation()
    segmentation.SetConversionParameter("Smoothing factor", str(smoothing))
    if not node.CreateClosedSurfaceRepresentation():
        raise RuntimeError(f"no closed surface could be made from {seg_path}")
    segments = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segment_id)
        surface = vtk.vtkPolyData()
        node.GetClosedSurfaceRepresentation(segment_id, surface)
        segments.append(Segment(segment_id, segment.GetName(), tuple(segment.GetColor()), surface))
    scene.Clear(1)
    return segments


def _view_geometry(segments: list[Segment], view) -> tuple[np.ndarray, np.ndarray, float]:
    bounds = np.array([s.surface.GetBounds() for s in segments if s.surface.GetNumberOfPoints()])
    low, high = bounds[:, 0::2].min(axis=0), bounds[:, 1::2].max(axis=0)
    direction = np.asarray(view, float)
    return (low + high) / 2, direction / np.linalg.norm(direction), float(np.linalg.norm(high - low)) / 2


def render_vtk(segments: list[Segment], size: tuple[int, int], view=DEFAULT_VIEW) -> np.ndarray:
    """RGB (h, w, 3) uint8 of the surfaces, rendered offscreen at twice the size and averaged down."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    width, height = size
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*_rgb(BACKGROUND))
    for segment in segments:
        if not segment.surface.GetNumberOfPoints():
            continue
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputData(segment.surface)
        normals.ConsistencyOn()
        normals.SplittingOff()
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*segment.color)
        prop.SetAmbient(0.12)
        prop.SetDiffuse(0.85)
        prop.SetSpecular(0.25)
        prop.SetSpecularPower(30)
        renderer.AddActor(actor)
    kit = vtk.vtkLightKit()
    kit.SetKeyLightIntensity(0.95)
    kit.AddLightsToRenderer(renderer)
    centre, direction, radius = _view_geometry(segments, view)
    camera = renderer.GetActiveCamera()
    camera.SetViewAngle(VIEW_ANGLE)
    camera.SetFocalPoint(*centre)
    # at this distance the sphere around the surfaces just fits the (narrower) view angle
    camera.SetPosition(*(centre + direction * radius * ZOOM / np.sin(np.radians(VIEW_ANGLE / 2))))
    camera.SetViewUp(0, 0, 1)
    camera.OrthogonalizeViewUp()
    renderer.ResetCameraClippingRange()

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(2 * width, 2 * height)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, 3)[::-1].astype(np.float32)
    window.Finalize()
    rgb = rgb.reshape(height, 2, width, 2, 3).mean(axis=(1, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _triangles(surface, max_triangles: int) -> np.ndarray:
    """(n, 3, 3) triangle corners of a surface decimated to about ``max_triangles``."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputData(surface)
    triangles.Update()
    polydata = triangles.GetOutput()
    count = polydata.GetNumberOfPolys()
    if count > max_triangles:
        decimate = vtk.vtkQuadricDecimation()
        decimate.SetInputData(polydata)
        decimate.SetTargetReduction(1.0 - max_triangles / count)
        decimate.Update()
        polydata = decimate.GetOutput()
    if not polydata.GetNumberOfPolys():
        return np.zeros((0, 3, 3))
    points = vtk_to_numpy(polydata.GetPoints().GetData())
    cells = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points[cells]


def render_matplotlib(ax, segments: list[Segment], view=DEFAULT_VIEW, max_triangles: int = 6000) -> None:
    """The fallback without GL: decimated surfaces in one depth-sorted Poly3DCollection, Lambert-shaded."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    centre, direction, radius = _view_geometry(segments, view)
    light = direction + np.array([0.3, 0.0, 0.8])
    light /= np.linalg.norm(light)
    faces, colors = [], []
    for segment in segments:
        tris = _triangles(segment.surface, max_triangles)
        if not len(tris):
            continue
        normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        shade = 0.25 + 0.75 * np.abs(normals @ light)  # the surface's orientation is not needed
        colors.append(np.clip(np.asarray(segment.color)[None] * shade[:, None], 0, 1))
        faces.append(tris)
    colors = np.concatenate(colors)  # edges in the face colour hide the seams between antialiased triangles
    collection = Poly3DCollection(np.concatenate(faces), facecolors=colors, edgecolors=colors, linewidths=0.3)
    ax.add_collection3d(collection)
    for set_lim, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        set_lim(c - radius, c + radius)
    ax.set_box_aspect((1, 1, 1), zoom=1.5)
    ax.view_init(elev=np.degrees(np.arcsin(direction[2])), azim=np.degrees(np.arctan2(direction[1], direction[0])))
    ax.set_proj_type("persp", focal_length=0.8)
    ax.set_axis_off()
    ax.set_facecolor(BACKGROUND)


# ------------------------------------------------------------------------------------------- slices

def _rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def segment_index_volume(seg_path: str | Path, image, segments: list[Segment]):
    """A uint8 image on ``image``'s grid: n + 1 where segment n of ``segments`` is (later segments win)."""
    import SimpleITK as sitk

    seg = sitk.ReadImage(str(seg_path))
    array = sitk.GetArrayFromImage(seg)
    layers = array if array.ndim == 4 else array[..., np.newaxis]
    header = {}
    n = 0
    while seg.HasMetaDataKey(f"Segment{n}_ID"):
        get = (lambda key, default, n=n: seg.GetMetaData(f"Segment{n}_{key}")
               if seg.HasMetaDataKey(f"Segment{n}_{key}") else default)
        header[get("ID", "")] = (int(get("Layer", "0")), int(float(get("LabelValue", "1"))))
        n += 1
    index = np.zeros(layers.shape[:3], np.uint8)
    for number, segment in enumerate(segments, start=1):
        layer, label = header[segment.segment_id]
        index[layers[..., layer] == label] = number
    out = sitk.GetImageFromArray(index)
    out.SetSpacing(seg.GetSpacing())
    out.SetOrigin(seg.GetOrigin())
    out.SetDirection(seg.GetDirection())
    # same grid as the image (the demo's case) or resampled onto it, nearest neighbour
    return sitk.Resample(out, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _slice_planes(index: np.ndarray):
    """(k, j, i) of the planes to show (array in LPS order: k inferior→superior, j anterior→posterior,
    i right→left): the plane showing the most segments, nearest the segmentation's centre."""
    mask = index > 0
    if not mask.any():
        return tuple(s // 2 for s in index.shape)
    centre = np.array(np.nonzero(mask)).mean(axis=1)
    chosen = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.zeros(index.shape[axis], int)
        for value in np.unique(index[mask]):
            present += (index == value).any(axis=others)
        best = np.flatnonzero(present == present.max())
        chosen.append(int(best[np.argmin(np.abs(best - centre[axis]))]))
    return tuple(chosen)


def draw_slices(fig, cells, image, index_image, segments: list[Segment], text_scale: float) -> None:
    """Axial, coronal, sagittal planes with filled outlines; ``cells`` = three axes rectangles (figure units)."""
    import SimpleITK as sitk
    from matplotlib import patheffects

    image = sitk.DICOMOrient(image, "LPS")
    index_image = sitk.DICOMOrient(index_image, "LPS")
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    if volume.ndim == 4:
        volume = volume.mean(axis=-1)
    index = sitk.GetArrayFromImage(index_image)
    sx, sy, sz = image.GetSpacing()
    # crop to the segmentation (+ 12 mm) so the structures fill the panels
    mask = index > 0
    if mask.any():
        nz = np.array(np.nonzero(mask))
        margin = np.ceil(12 / np.array([sz, sy, sx])).astype(int)
        low = np.maximum(nz.min(axis=1) - margin, 0)
        high = np.minimum(nz.max(axis=1) + margin + 1, index.shape)
        crop = tuple(slice(a, b) for a, b in zip(low, high))
        volume, index = volume[crop], index[crop]
    inside = volume[index > 0] if (index > 0).any() else volume
    vmin, vmax = np.percentile(volume, 1), np.percentile(inside, 99.5)
    k, j, i = _slice_planes(index)
    colors = np.array([(0, 0, 0)] + [s.color for s in segments], float)
    # (plane image, labels, pixel width, pixel height, title, left/right/top/bottom letters);
    # rows run top → bottom, so superior/anterior is put at the top.
    planes = [(volume[k], index[k], sx, sy, "axial", ("R", "L", "A", "P")),
              (volume[::-1, j], index[::-1, j], sx, sz, "coronal", ("R", "L", "S", "I")),
              (volume[::-1, :, i], index[::-1, :, i], sy, sz, "sagittal", ("A", "P", "S", "I"))]
    for rect, (plane, labels, du, dv, title, letters) in zip(cells, planes):
        ax = fig.add_axes(rect)
        extent = (0, plane.shape[1] * du, plane.shape[0] * dv, 0)
        ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, extent=extent, interpolation="bilinear")
        fill = np.zeros(labels.shape + (4,), np.float32)
        fill[..., :3] = colors[labels]
        fill[..., 3] = np.where(labels > 0, 0.28, 0.0)
        ax.imshow(fill, extent=extent, interpolation="nearest")
        rows = (np.arange(plane.shape[0]) + 0.5) * dv
        cols = (np.arange(plane.shape[1]) + 0.5) * du
        for number, segment in enumerate(segments, start=1):
            if (labels == number).any():
                ax.contour(cols, rows, (labels == number).astype(np.float32), levels=[0.5],
                           colors=[segment.color], linewidths=max(1.0, 1.4 * text_scale))
        ax.set_xlim(0, extent[1])
        ax.set_ylim(extent[2], 0)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(title, color=FOREGROUND, fontsize=12 * text_scale, pad=3 * text_scale)
        style = dict(color="#d8dee4", fontsize=9 * text_scale, fontweight="bold", transform=ax.transAxes,
                     path_effects=[patheffects.withStroke(linewidth=2.5 * text_scale, foreground="black")])
        left, right, top, bottom = letters
        ax.text(0.01, 0.5, left, ha="left", va="center", **style)
        ax.text(0.99, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.99, top, ha="center", va="top", **style)
        ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


# ------------------------------------------------------------------------------------------- figure

def demo_dice(dice_path: str | Path | None, seg_path: str | Path) -> dict | None:
    """{'method', 'mean', 'per_structure', 'given', 'evaluated', 'extent'} of the segmentation's method in the
    demo's dice.json (first level), or None."""
    if not dice_path or not Path(dice_path).is_file():
        return None
    stem = Path(seg_path).name.removesuffix(".seg.nrrd")
    method = METHODS.get(stem, (None, ""))[0]
    data = json.loads(Path(dice_path).read_text(encoding="utf-8"))
    level = data["levels"][0]
    if method not in level.get("methods", {}):
        return None
    extent = data.get("extent")
    return {"method": method, "mean": level["methods"][method]["mean_dice"],
            "per_structure": level["methods"][method]["dice"], "given": len(level["given"]),
            "evaluated": level["evaluated_count"], "every": level["every"], "percent": level["percent"],
            "extent": (extent[1] - extent[0] + 1) if extent else None}


def render_figure(seg_path: str | Path, image_path: str | Path, out_path: str | Path,
                  dice_path: str | Path | None = None, size: tuple[int, int] = (1600, 800), backend: str = "auto",
                  title: str | None = None, view=DEFAULT_VIEW) -> dict:
    """Write the PNG; returns {'path', 'backend' ('vtk' or 'matplotlib'), 'window' (the VTK window class or
    None), 'segments' (names)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from matplotlib.patches import Rectangle

    if backend not in ("auto", "vtk", "matplotlib"):
        raise ValueError(f"backend must be auto, vtk or matplotlib, not {backend!r}")
    width, height = size
    window = None
    if backend in ("auto", "vtk"):  # probe first: a GL library that fails to load can crash this process
        window = find_gl_route()
        if window is None and backend == "vtk":
            raise RuntimeError("VTK cannot render offscreen here (no display, EGL or OSMesa library): install "
                               "Debian libegl1 libegl-mesa0 or libosmesa6, or use --backend matplotlib")
    used = "vtk" if window else "matplotlib"

    segments = closed_surfaces(seg_path)
    if not any(s.surface.GetNumberOfPoints() for s in segments):
        raise RuntimeError(f"{seg_path} holds no segment with any voxel: nothing to render")
    image = sitk.ReadImage(str(image_path))
    index_image = segment_index_volume(seg_path, image, segments)
    info = demo_dice(dice_path, seg_path)

    text_scale = height / 800
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor=BACKGROUND)
    half = 0.5
    # left half: the 3D view, a title above it
    if used == "vtk":
        ax3d = fig.add_axes((0, 0, half, 1))
        ax3d.imshow(render_vtk(segments, (width // 2, height), view), interpolation="none")
        ax3d.set_axis_off()
    else:
        ax3d = fig.add_axes((0, 0, half, 1), projection="3d")
        render_matplotlib(ax3d, segments, view)
    stem = Path(seg_path).name.removesuffix(".seg.nrrd")
    method_name = METHODS.get(stem, (None, Path(seg_path).name))[1]
    if title is None:
        title = (f"H-SAM fine-tuned on {info['percent']:g} % of the axial slices: mean Dice {info['mean']:.3f}"
                 if info else method_name)
    fig.text(0.015, 0.975, title, color=FOREGROUND, fontsize=15 * text_scale, fontweight="bold", va="top")
    if info:
        sub = (f"{method_name}; {info['given']} of {info['extent'] or '?'} slices given (every {info['every']}th), "
               f"Dice on the other {info['evaluated']}")
        fig.text(0.015, 0.975 - 0.042, sub, color="#aab2ba", fontsize=11 * text_scale, va="top")
    renderer_note = ("3D: slicer-core closed surfaces, VTK offscreen" if used == "vtk"
                     else "3D: slicer-core closed surfaces, matplotlib (no GL)")
    fig.text(0.015, 0.015, renderer_note, color="#6f7880", fontsize=8 * text_scale, va="bottom")

    # right half: axial | coronal over sagittal | legend
    pad = 0.012
    cw, ch = (half - 3 * pad) / 2, (1 - 3 * pad) / 2
    x0, x1 = half + pad, half + 2 * pad + cw
    y_top, y_bottom = 0.5 + pad / 2, pad
    cells = [(x0, y_top, cw, ch - 0.03), (x1, y_top, cw, ch - 0.03), (x0, y_bottom, cw, ch - 0.03)]
    draw_slices(fig, cells, image, index_image, segments, text_scale)

    legend = fig.add_axes((x1, y_bottom, cw, ch))
    legend.set_axis_off()
    legend.set_xlim(0, 1)
    legend.set_ylim(0, 1)
    rows = len(segments) + (1 if info else 0)
    step = min(0.1, 0.9 / max(rows, 1))
    y = 0.5 + step * rows / 2
    if info:
        legend.text(0.93, y, "Dice", color="#aab2ba", fontsize=11 * text_scale, ha="right", va="center")
        y -= step
    for segment in segments:
        legend.add_patch(Rectangle((0.04, y - step * 0.3), 0.07, step * 0.6, color=segment.color))
        legend.text(0.15, y, segment.name, color=FOREGROUND, fontsize=12.5 * text_scale, va="center")
        if info and segment.name in info["per_structure"]:
            legend.text(0.93, y, f"{info['per_structure'][segment.name]:.3f}", color=FOREGROUND,
                        fontsize=12.5 * text_scale, ha="right", va="center", family="monospace")
        y -= step

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100, facecolor=BACKGROUND)
    plt.close(fig)
    return {"path": out_path, "backend": used, "window": window, "segments": [s.name for s in segments]}


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", nargs="?", default="hsam-demo",
                        help="an `hsam demo --out DIR` folder (default ./hsam-demo, the demo's default)")
    parser.add_argument("--seg", help=f"segmentation (default DEMO_DIR/{DEMO_FILES['seg']})")
    parser.add_argument("--image", help=f"its image (default DEMO_DIR/{DEMO_FILES['image']}, else {COLIN27})")
    parser.add_argument("--dice", help=f"the demo's Dice results (default DEMO_DIR/{DEMO_FILES['dice']}; '' for none)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG to write (default %(default)s)")
    parser.add_argument("--size", type=_size, default=(1600, 800), help="WIDTHxHEIGHT pixels (default 1600x800)")
    parser.add_argument("--backend", choices=("auto", "vtk", "matplotlib"), default="auto")
    parser.add_argument("--title", help="the line above the 3D view (default: method and mean Dice)")
    parser.add_argument("--view", type=lambda t: tuple(float(v) for v in t.split(",")), default=DEFAULT_VIEW,
                        help="camera direction from the centre in RAS (default %(default)s)")
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir)
    seg = Path(args.seg) if args.seg else demo / DEMO_FILES["seg"]
    image = Path(args.image) if args.image else demo / DEMO_FILES["image"]
    if not args.image and not image.is_file() and COLIN27.is_file():
        image = COLIN27
    dice = (args.dice or None) if args.dice is not None else demo / DEMO_FILES["dice"]
    for path, what in ((seg, "segmentation"), (image, "image")):
        if not path.is_file():
            parser.error(f"no {what} at {path} (run `hsam demo --out {demo}` first, or pass --seg/--image)")
    result = render_figure(seg, image, args.out, dice, size=args.size, backend=args.backend, title=args.title,
                           view=args.view)
    route = (f"VTK offscreen ({result['window']})" if result["backend"] == "vtk" else
             "matplotlib 3D" + (" (no GL route works)" if args.backend == "auto" else ""))
    print(f"wrote {result['path']} ({args.size[0]}x{args.size[1]}; 3D: {route}; "
          f"{len(result['segments'])} segments)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
