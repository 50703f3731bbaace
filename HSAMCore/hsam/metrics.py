"""Segmentation metrics: Dice and HD95, both as the H-SAM/TransUNet papers publish them and as they should be.

Two conventions side by side (see ``hsam evaluate``):

* **Published** (:func:`published_case_metrics`): what the H-SAM, SAMed and TransUNet testers report per case
  and organ. Dice and HD95 as medpy's ``metric.binary.dc``/``hd95`` define them, with HD95 in **voxel units**
  (spacing ignored) and these edge rules:

  ==========================  ============  ==========
  prediction / ground truth   Dice          HD95
  ==========================  ============  ==========
  non-empty / non-empty       Dice          HD95 (vox)
  non-empty / empty           1             0
  empty / non-empty           0             0
  empty / empty               0             0
  ==========================  ============  ==========

  A false-positive organ therefore scores perfectly, and a missed organ scores the best possible HD95.

* **Correct** (:func:`correct_case_metrics`): HD95 in **mm** using the voxel spacing, and undefined values
  reported as undefined (NaN, ``null`` in JSON) instead of being invented:

  ==========================  ============  ==========
  prediction / ground truth   Dice          HD95 (mm)
  ==========================  ============  ==========
  non-empty / non-empty       Dice          HD95 (mm)
  non-empty / empty           0             NaN
  empty / non-empty           0             NaN
  empty / empty               NaN (absent)  NaN
  ==========================  ============  ==========

  Dice 0 for a one-sided empty case is what the Dice formula gives (no overlap); a class absent from both is
  not an observation and is left out of the means. HD95 between a mask and nothing is undefined; such cases
  are left out of the HD95 means and counted (``n_hd95`` vs ``n_cases`` in :func:`aggregate`), so a model that
  misses organs is visible rather than rewarded.

Surfaces and distances follow medpy's definition: the surface of a mask is ``mask XOR erosion(mask)`` with
the face-connected (6-neighbour in 3D) structuring element and voxels outside the array counted as
background; the distances are Euclidean, from every surface voxel of one mask to the nearest surface voxel of
the other (an exact distance transform scaled by ``spacing``), in both directions; HD95 is the 95th percentile
(linear interpolation) of the two distance sets pooled. Everything is computed inside the bounding box of
prediction ∪ ground truth (plus one voxel), which gives identical numbers in a fraction of the time.

Arrays are NumPy arrays of any dimension ≥ 1; ``spacing`` lists the voxel size per **array axis** (for an
array from ``SimpleITK.GetArrayFromImage``, axes (k, j, i), that is ``image.GetSpacing()[::-1]``).
Nothing here imports torch. SciPy is needed (``pip install scipy``).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "CaseMetric", "dice", "hd95", "surface_distances", "published_case_metrics", "correct_case_metrics",
    "aggregate",
]


class CaseMetric(NamedTuple):
    """Dice (0..1) and HD95 of one class in one case; NaN where undefined (correct convention only)."""

    dice: float
    hd95: float


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as exc:  # scipy is not a hard dependency of the segmentation core
        from .errors import HSAMError

        raise HSAMError("evaluating HD95 needs SciPy, which is not installed: run `pip install scipy`") from exc
    return ndimage


def _as_bool(mask, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == 0:
        raise ValueError(f"{name} must be an array of at least one dimension, got a scalar")
    return array.astype(bool, copy=False)


def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt differ in shape: {p.shape} vs {g.shape}")
    return p, g


def _spacing(spacing, ndim: int) -> np.ndarray | None:
    if spacing is None:
        return None
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.shape != (ndim,):
        raise ValueError(f"spacing needs one value per array axis ({ndim}), got {list(values)}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be positive and finite, got {list(values)}")
    return values


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of ``mask``'s non-zero bounding box grown by ``margin`` (clipped to the array); None if empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other) if other else mask)
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def dice(pred, gt) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|) of two masks of equal shape (any dimension; non-zero = inside).

    Returns NaN when both masks are empty (undefined); 0.0 when exactly one is empty.
    """
    p, g = _check_pair(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(p & g)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """medpy's surface: the voxels of ``mask`` that a face-connected erosion removes (outside = background)."""
    ndimage = _ndimage()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def surface_distances(pred, gt, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Distances between the surfaces of two non-empty masks of equal shape, as medpy computes them.

    Returns ``(d_pred_to_gt, d_gt_to_pred)``: 1-D float64 arrays, one distance per surface voxel of ``pred``
    (to the nearest surface voxel of ``gt``) and of ``gt`` (to ``pred``'s surface), in voxel units when
    ``spacing`` is None, else in the units of ``spacing`` (one value per array axis, or one for all).
    Raises ValueError if either mask is empty (the distance is undefined).
    """
    p, g = _check_pair(pred, gt)
    sampling = _spacing(spacing, p.ndim)
    box = _bounding_box(p | g)
    if box is None or not p.any() or not g.any():
        which = "both masks are" if box is None else ("pred is" if not p.any() else "gt is")
        raise ValueError(f"surface distances are undefined: {which} empty")
    p, g = p[box], g[box]
    p_surface, g_surface = _surface(p), _surface(g)
    return _distances_to(g_surface, p_surface, sampling), _distances_to(p_surface, g_surface, sampling)


def _distances_to(target: np.ndarray, sources: np.ndarray, sampling: np.ndarray | None) -> np.ndarray:
    """Euclidean distance from every True voxel of ``sources`` to the nearest True voxel of ``target``.

    The exact Euclidean distance transform of ``~target`` read at ``sources``, as medpy reads it; computed from
    the feature transform (nearest-target indices) at the source voxels only, so no full-size float distance
    map is built (same numbers, a third of the memory).
    """
    ndimage = _ndimage()
    nearest = ndimage.distance_transform_edt(~target, sampling=sampling, return_distances=False,
                                             return_indices=True)
    where = np.nonzero(sources)
    offsets = np.stack([nearest[axis][where] - where[axis] for axis in range(target.ndim)]).astype(np.float64)
    if sampling is not None:
        offsets *= sampling[:, np.newaxis]
    return np.sqrt(np.add.reduce(offsets * offsets, axis=0))


def hd95(pred, gt, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty masks of equal shape (medpy's ``hd95``).

    The 95th percentile (linear interpolation) of all pred→gt and gt→pred surface distances pooled
    (:func:`surface_distances`). ``spacing`` None gives voxel units (the published convention); give the
    voxel size per array axis (e.g. ``image.GetSpacing()[::-1]`` for a SimpleITK array) for millimetres.
    Raises ValueError if either mask is empty; :func:`published_case_metrics` and
    :func:`correct_case_metrics` apply the edge rules instead.
    """
    to_g, to_p = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([to_g, to_p]), 95))


def _class_boxes(labels: np.ndarray, classes: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of each class value in a label map, in one pass (None where the class is absent)."""
    ndimage = _ndimage()
    array = np.asarray(labels)
    if array.dtype.kind not in "biu":
        if array.dtype.kind != "f" or not np.array_equal(array, np.round(array)):
            raise ValueError(f"label maps must hold integer label values, got {array.dtype}")
        array = array.astype(np.int64)
    top = max(classes, default=0)
    if top <= 0:
        return {c: None for c in classes}
    clipped = np.where((array > 0) & (array <= top), array, 0) if array.min(initial=0) < 0 or \
        array.max(initial=0) > top else array
    if clipped.dtype.kind == "b":
        clipped = clipped.astype(np.uint8)
    found = ndimage.find_objects(clipped, max_label=top)
    return {c: found[c - 1] for c in classes}


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: tuple[int, ...],
               margin: int = 1) -> tuple[slice, ...] | None:
    boxes = [x for x in (a, b) if x is not None]
    if not boxes:
        return None
    return tuple(slice(max(min(x[d].start for x in boxes) - margin, 0),
                       min(max(x[d].stop for x in boxes) + margin, shape[d])) for d in range(len(shape)))


def _check_labels(pred_labels, gt_labels, classes: Iterable[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    pred, gt = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    if pred.ndim == 0:
        raise ValueError("label maps must be arrays, got scalars")
    values = [int(c) for c in classes]
    if any(c <= 0 for c in values):
        raise ValueError(f"classes must be positive label values (0 is background), got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"classes repeat a value: {values}")
    return pred, gt, values


def _per_class(pred_labels, gt_labels, classes, spacing, rule) -> dict[int, CaseMetric]:
    pred, gt, values = _check_labels(pred_labels, gt_labels, classes)
    pred_boxes, gt_boxes = _class_boxes(pred, values), _class_boxes(gt, values)
    out = {}
    for c in values:
        box = _union_box(pred_boxes[c], gt_boxes[c], pred.shape)
        if box is None:
            p = g = np.zeros((0,) * pred.ndim, dtype=bool)
        else:
            p, g = pred[box] == c, gt[box] == c
        out[c] = rule(p, g, spacing)
    return out


def _published_rule(p: np.ndarray, g: np.ndarray, _spacing) -> CaseMetric:
    has_p, has_g = bool(p.any()), bool(g.any())
    if has_p and has_g:
        return CaseMetric(dice(p, g), hd95(p, g))
    if has_p:  # prediction non-empty, ground truth empty
        return CaseMetric(1.0, 0.0)
    return CaseMetric(0.0, 0.0)


def _correct_rule(p: np.ndarray, g: np.ndarray, spacing) -> CaseMetric:
    has_p, has_g = bool(p.any()), bool(g.any())
    if has_p and has_g:
        return CaseMetric(dice(p, g), hd95(p, g, spacing))
    if has_p or has_g:
        return CaseMetric(0.0, math.nan)
    return CaseMetric(math.nan, math.nan)


def published_case_metrics(pred_labels, gt_labels, classes: Iterable[int]) -> dict[int, CaseMetric]:
    """Per-class Dice and HD95 of one case **as the H-SAM/TransUNet papers publish them**.

    ``pred_labels``, ``gt_labels``: integer label maps of equal shape (e.g. (z, y, x)); ``classes``: the label
    values to evaluate (each binarised as ``labels == value``). HD95 is in voxel units (spacing ignored), with
    the published edge rules: prediction non-empty & ground truth empty → (Dice 1, HD95 0); prediction empty →
    (0, 0), whether or not the ground truth is empty. Returns ``{value: CaseMetric(dice, hd95)}``, never NaN.
    """
    return _per_class(pred_labels, gt_labels, classes, None, _published_rule)


def correct_case_metrics(pred_labels, gt_labels, classes: Iterable[int], spacing=None) -> dict[int, CaseMetric]:
    """Per-class Dice and HD95 of one case with physical HD95 and undefined values left undefined.

    Same inputs as :func:`published_case_metrics` plus ``spacing``: voxel size per array axis (mm; e.g.
    ``image.GetSpacing()[::-1]`` for a SimpleITK array), None for voxel units. Edge rules: one of prediction or
    ground truth empty → (Dice 0, HD95 NaN); both empty → (NaN, NaN), the class is absent and is left out of
    means. Returns ``{value: CaseMetric(dice, hd95)}``.
    """
    pred, _gt, values = _check_labels(pred_labels, gt_labels, classes)
    sampling = _spacing(spacing, pred.ndim)
    return _per_class(pred_labels, gt_labels, values, sampling, _correct_rule)


def _mean(values: Sequence[float]) -> tuple[float, int]:
    finite = [v for v in values if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def aggregate(cases: Sequence[Mapping[int, CaseMetric]], classes: Iterable[int] | None = None) -> dict:
    """Means over cases per class, then the mean over classes (as the published testers average).

    ``cases``: one ``{value: CaseMetric}`` per case (from :func:`published_case_metrics` or
    :func:`correct_case_metrics`); ``classes``: the values to aggregate (default: those of the first case).
    NaN entries are left out of every mean. Returns::

        {"per_class": {value: {"dice", "hd95", "n_cases", "n_dice", "n_hd95"}},
         "mean": {"dice", "hd95"}}

    where ``n_dice``/``n_hd95`` count the cases each mean is over (fewer than ``n_cases`` when undefined
    values were left out), and ``mean`` averages the per-class means that are defined. Means are NaN when
    nothing is defined. For published metrics (never NaN) this equals the testers' plain means.
    """
    values = [int(c) for c in classes] if classes is not None else (list(cases[0]) if cases else [])
    per_class = {}
    for c in values:
        rows = [case[c] for case in cases if c in case]
        dice_mean, n_dice = _mean([r.dice for r in rows])
        hd_mean, n_hd = _mean([r.hd95 for r in rows])
        per_class[c] = {"dice": dice_mean, "hd95": hd_mean, "n_cases": len(rows), "n_dice": n_dice, "n_hd95": n_hd}
    return {"per_class": per_class,
            "mean": {"dice": _mean([v["dice"] for v in per_class.values()])[0],
                     "hd95": _mean([v["hd95"] for v in per_class.values()])[0]}}
