"""Overlay pictures of label maps on a volume: three orthogonal views, atlas vs prediction. No torch.

The views are resampled to patient orientation without interpolation (transposes and flips only, as
:mod:`hsam.data.orientation` does): axial (anterior up, patient left on the right — radiological), coronal
(superior up) and sagittal (superior up, anterior left), each through the centre of the labelled region and
scaled by the voxel spacing. With matplotlib the figure gets titles and a legend; without it a plain PNG grid
is written by a small built-in encoder.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

VIEWS = (("axial", "SPL"), ("coronal", "PIL"), ("sagittal", "LIP"))


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image as PNG (no dependencies)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(png)
    return path


def _view(image, array_kji: np.ndarray, code: str, index: float) -> tuple[np.ndarray, float]:
    """The slice at relative position ``index`` (0..1) of ``array_kji`` in the orientation ``code``, and its
    row/column pixel aspect."""
    from .data.orientation import reorientation_for
    from .description import OrientationSpec

    spec = OrientationSpec.from_code(code, source="display")
    reorient = reorientation_for(image, spec)
    stack = reorient.to_model(array_kji)
    s = int(round(index * (stack.shape[0] - 1)))
    return stack[s], reorient.spacing.row / reorient.spacing.column


def _centre(image, labels_kji: np.ndarray, code: str) -> float:
    """Relative position (0..1) of the labelled region's centre along the view's slice axis."""
    from .data.orientation import reorientation_for
    from .description import OrientationSpec

    reorient = reorientation_for(image, OrientationSpec.from_code(code, source="display"))
    mask = reorient.to_model((labels_kji > 0).astype(np.uint8))
    planes = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
    if not len(planes):
        return 0.5
    return float((planes[0] + planes[-1]) / 2 / max(1, mask.shape[0] - 1))


def _gray(volume: np.ndarray) -> tuple[float, float]:
    values = volume[volume > volume.min()] if (volume > volume.min()).any() else volume
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def blend(gray: np.ndarray, labels: np.ndarray, colors: dict[int, tuple[int, int, int]], window: tuple[float, float],
          alpha: float = 0.5) -> np.ndarray:
    """(H, W) intensities + (H, W) label values → (H, W, 3) uint8 with the labels' colours blended in."""
    lo, hi = window
    g = np.clip((gray.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
    rgb = np.repeat(g[..., None], 3, axis=2)
    for value, color in colors.items():
        mask = labels == value
        if mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(color, np.float32)
    return rgb.astype(np.uint8)


def _stretch(rgb: np.ndarray, aspect: float, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling by ``scale`` with rows stretched by ``aspect`` (row/column spacing)."""
    h, w = rgb.shape[:2]
    rows = np.clip((np.arange(int(round(h * aspect * scale))) / (aspect * scale)).astype(int), 0, h - 1)
    cols = np.clip((np.arange(w * scale) / scale).astype(int), 0, w - 1)
    return rgb[rows][:, cols]


def overlay_panels(image, volume_kji: np.ndarray, rows: Sequence[tuple[str, np.ndarray]], labelset,
                   scale: int = 2) -> list[list[np.ndarray]]:
    """RGB panels: one row per (title, label map), one column per view (axial, coronal, sagittal)."""
    colors = {c.value: tuple(c.color) for c in labelset.classes}
    window = _gray(np.asarray(volume_kji))
    reference = rows[0][1]
    out = []
    for _title, labels in rows:
        line = []
        for _name, code in VIEWS:
            position = _centre(image, reference, code)
            gray, aspect = _view(image, np.asarray(volume_kji), code, position)
            lab, _ = _view(image, np.asarray(labels), code, position)
            line.append(_stretch(blend(gray, lab, colors, window), aspect, scale))
        out.append(line)
    return out


def write_overlay(path: str | Path, image, volume_kji: np.ndarray, rows: Sequence[tuple[str, np.ndarray]], labelset,
                  title: str = "") -> Path:
    """A PNG with the label maps of ``rows`` (e.g. atlas, prediction) over ``volume_kji`` in three views."""
    panels = overlay_panels(image, volume_kji, rows, labelset)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return _write_grid(path, panels)
    fig, axes = plt.subplots(len(rows), len(VIEWS), figsize=(3.2 * len(VIEWS), 3.3 * len(rows) + 0.8), dpi=110)
    axes = np.atleast_2d(axes)
    for r, (row_title, _labels) in enumerate(rows):
        for c, (view, _code) in enumerate(VIEWS):
            ax = axes[r, c]
            ax.imshow(panels[r][c])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row_title} — {view}", fontsize=9)
    handles = [Patch(color=np.asarray(c.color) / 255, label=c.name) for c in labelset.classes]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97 if title else 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_grid(path: str | Path, panels: list[list[np.ndarray]], gap: int = 6) -> Path:
    height = max(p.shape[0] for line in panels for p in line)
    widths = [max(line[c].shape[1] for line in panels) for c in range(len(panels[0]))]
    canvas = np.full((len(panels) * (height + gap) + gap, sum(widths) + gap * (len(widths) + 1), 3), 255, np.uint8)
    y = gap
    for line in panels:
        x = gap
        for c, p in enumerate(line):
            canvas[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += widths[c] + gap
        y += height + gap
    return write_png(path, canvas)
