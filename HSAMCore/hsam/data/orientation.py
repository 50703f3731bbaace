"""Bring any 3D volume into the model's slice stack and back, exactly, without resampling.

Conventions
-----------
* A SimpleITK image has voxel axes (i, j, k); ``GetArrayFromImage`` returns the array ordered
  ``(k, j, i)``. Its direction matrix ``D`` (3×3, row-major from ``GetDirection()``) has as column ``a``
  the unit vector of voxel axis ``a`` in LPS patient coordinates (x → Left, y → Posterior, z → Superior).
* The model works on a stack ``(slices, rows, columns)``; an :class:`~hsam.description.OrientationSpec`
  names, for each of these three array axes, the patient direction its index increases toward
  (``SPL`` = DICOM axial stack: slices toward S, rows toward P, columns toward L).
* Orientation codes of voxel axes here use the same "toward" meaning: ``"LPS"`` for an image means
  i → L, j → P, k → S. (ITK/DICOM "from" codes such as ``RAI`` name the opposite letters.)

Each voxel axis is assigned its nearest patient axis and sign; for oblique directions the assignment
is the permutation maximising the sum of |cosines|, so it is always a permutation, even at 45°.
The volume is then only transposed and flipped: every voxel keeps its value and the inverse mapping is
bit-exact. The slices the model sees are tilted by up to :func:`obliqueness_degrees` from true
patient planes; above :data:`OBLIQUE_WARN_DEGREES` a warning says so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from ..description import OrientationSpec
from ..errors import InputVolumeError

OBLIQUE_WARN_DEGREES = 10.0

_TOWARD_POSITIVE = "LPS"  # letter of patient axis x, y, z when the index increases along +x, +y, +z (LPS)
_TOWARD_NEGATIVE = "RAI"
_PLANE_OF_AXIS = ("sagittal", "coronal", "axial")  # plane perpendicular to patient axis x, y, z
_VOXEL_AXIS_NAMES = ("i", "j", "k")


def letter_axis_sign(letter: str) -> tuple[int, int]:
    """Patient axis (0 = x L/R, 1 = y P/A, 2 = z S/I) and sign (+1 toward L/P/S, -1 toward R/A/I)."""
    letter = letter.upper()
    if letter in _TOWARD_POSITIVE:
        return _TOWARD_POSITIVE.index(letter), 1
    if letter in _TOWARD_NEGATIVE:
        return _TOWARD_NEGATIVE.index(letter), -1
    raise ValueError(f"not a patient direction letter (LRAPSI): {letter!r}")


def axis_sign_letter(axis: int, sign: int) -> str:
    """Inverse of :func:`letter_axis_sign`."""
    return (_TOWARD_POSITIVE if sign > 0 else _TOWARD_NEGATIVE)[axis]


def _direction_matrix(image: sitk.Image) -> np.ndarray:
    """(3, 3) direction matrix; column a = voxel axis a (i, j, k) in LPS, normalised to unit length."""
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    norms = np.linalg.norm(d, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(d)):
        raise InputVolumeError(f"the image's direction matrix {d.tolist()} is degenerate (a zero or non-finite "
                               "axis): the file's orientation header is broken; fix or re-export the volume")
    return d / norms


def nearest_patient_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each voxel axis a (column a of the (3, 3) LPS ``direction``), its nearest patient axis and sign.

    Returns ``(patient_axis, sign)``, both indexed by voxel axis (i, j, k). The axes form the
    permutation maximising ``sum_a |direction[patient_axis[a], a]|`` (first one wins an exact tie).
    """
    direction = np.asarray(direction, dtype=np.float64)
    unit = direction / np.linalg.norm(direction, axis=0)
    best = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(unit[p[a], a]) for a in range(3)))
    signs = tuple(1 if unit[best[a], a] >= 0 else -1 for a in range(3))
    return tuple(best), signs  # type: ignore[return-value]


def _obliqueness(unit: np.ndarray, patient_axis: tuple[int, int, int]) -> float:
    cosines = [min(1.0, abs(unit[patient_axis[a], a])) for a in range(3)]
    return max(math.degrees(math.acos(c)) for c in cosines)


def obliqueness_degrees(image: sitk.Image) -> float:
    """Largest angle (degrees) between a voxel axis and the patient axis it is assigned to (0 = not oblique)."""
    unit = _direction_matrix(image)
    patient_axis, _ = nearest_patient_axes(unit)
    return _obliqueness(unit, patient_axis)


def image_axis_codes(image: sitk.Image) -> str:
    """Nearest "toward" letters of voxel axes i, j, k, e.g. ``"LPS"`` for a DICOM axial series."""
    patient_axis, signs = nearest_patient_axes(_direction_matrix(image))
    return "".join(axis_sign_letter(patient_axis[a], signs[a]) for a in range(3))


class ModelSpacing(NamedTuple):
    """Voxel spacing in mm along the model's array axes (slices, rows, columns)."""

    slice: float
    row: float
    column: float


@dataclass(frozen=True)
class Reorientation:
    """Transpose + flips between an input array ``(k, j, i)`` and the model stack ``(slices, rows, columns)``.

    ``to_model(x) = flip(transpose(x, permutation), axes where flips)``; ``to_input`` is its exact inverse.

    Attributes:
        permutation: for model axis m (slices, rows, columns), the input array axis (0 = k, 1 = j, 2 = i)
            it comes from, as given to ``np.transpose``.
        flips: per model axis, whether its index runs opposite to the input axis after transposing.
        input_shape: the input array shape ``(k, j, i)`` = reversed ``image.GetSize()``.
        spacing: mm per voxel along (slices, rows, columns).
        input_axis_codes: nearest "toward" letters of voxel axes i, j, k (e.g. ``"LPS"``).
        model_code: the model's (slice, row, column) letters (e.g. ``"SPL"``).
        obliqueness: largest angle in degrees between a voxel axis and its patient axis.
    """

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    input_shape: tuple[int, int, int]
    spacing: ModelSpacing
    input_axis_codes: str = ""
    model_code: str = ""
    obliqueness: float = 0.0

    def __post_init__(self) -> None:
        if sorted(self.permutation) != [0, 1, 2]:
            raise ValueError(f"permutation {self.permutation} is not a permutation of (0, 1, 2)")

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """Shape of the model stack (slices, rows, columns)."""
        return tuple(self.input_shape[p] for p in self.permutation)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return self.model_shape[0]

    @property
    def inverse_permutation(self) -> tuple[int, int, int]:
        """For input array axis n, the model axis it goes to."""
        return tuple(int(x) for x in np.argsort(self.permutation))  # type: ignore[return-value]

    @property
    def slice_voxel_axis(self) -> int:
        """The voxel axis (0 = i, 1 = j, 2 = k) the model slices along."""
        return 2 - self.permutation[0]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    @property
    def warnings(self) -> list[str]:
        """Human-readable warnings (oblique volume)."""
        if self.obliqueness <= OBLIQUE_WARN_DEGREES:
            return []
        return [f"the volume is oblique: its voxel axes are up to {self.obliqueness:.1f}° off the patient axes. "
                f"It is segmented along its own voxel planes (the nearest to "
                f"{_PLANE_OF_AXIS[letter_axis_sign(self.model_code[0])[0]]} ones) without resampling, so "
                "the model sees tilted slices and may be less accurate; if results are poor, resample the "
                "volume to an axis-aligned grid first"]

    def to_model(self, array_kji: np.ndarray) -> np.ndarray:
        """Input-ordered array ``(k, j, i, ...)`` → model stack ``(slices, rows, columns, ...)``.

        Any dtype; trailing axes (e.g. channels) are carried along unchanged. Returns a C-contiguous copy.
        """
        array_kji = np.asarray(array_kji)
        if array_kji.ndim < 3 or tuple(array_kji.shape[:3]) != tuple(self.input_shape):
            raise ValueError(f"expected an input-ordered array of shape {self.input_shape} (k, j, i), "
                             f"got {array_kji.shape}")
        order = list(self.permutation) + list(range(3, array_kji.ndim))
        out = np.transpose(array_kji, order)
        flip_axes = tuple(m for m in range(3) if self.flips[m])
        if flip_axes:
            out = np.flip(out, axis=flip_axes)
        return np.ascontiguousarray(out)

    def to_input(self, array_model: np.ndarray) -> np.ndarray:
        """Model stack ``(slices, rows, columns, ...)`` → input order ``(k, j, i, ...)``; exact inverse of
        :meth:`to_model` (bit-exact, any dtype). Returns a C-contiguous copy."""
        array_model = np.asarray(array_model)
        if array_model.ndim < 3 or tuple(array_model.shape[:3]) != tuple(self.model_shape):
            raise ValueError(f"expected a model-ordered array of shape {self.model_shape} "
                             f"(slices, rows, columns), got {array_model.shape}")
        flip_axes = tuple(m for m in range(3) if self.flips[m])
        out = np.flip(array_model, axis=flip_axes) if flip_axes else array_model
        order = list(self.inverse_permutation) + list(range(3, array_model.ndim))
        return np.ascontiguousarray(np.transpose(out, order))

    def model_slice_index(self, index: int, voxel_axis: int = 2) -> int:
        """The model slice holding voxel-axis index ``index`` (default: k, as ``hsam finetune --slices`` uses).

        Raises ValueError if the model does not slice along ``voxel_axis``.
        """
        if voxel_axis != self.slice_voxel_axis:
            raise ValueError(f"the model slices along voxel axis {_VOXEL_AXIS_NAMES[self.slice_voxel_axis]} of "
                             f"this volume, not {_VOXEL_AXIS_NAMES[voxel_axis]}: a {_VOXEL_AXIS_NAMES[voxel_axis]} "
                             "index is not one model slice")
        n = self.model_shape[0]
        if not 0 <= index < n:
            raise IndexError(f"slice index {index} outside 0..{n - 1}")
        return n - 1 - index if self.flips[0] else index


def reorientation_for(image: sitk.Image, spec: OrientationSpec) -> Reorientation:
    """The :class:`Reorientation` taking ``image``'s array ``(k, j, i)`` to ``spec``'s (slices, rows, columns).

    Raises InputVolumeError for non-3D images and for single-slice volumes whose one-voxel axis is not
    the model's slice axis (e.g. a single sagittal slice given to an axial model).
    """
    if image.GetDimension() != 3:
        raise InputVolumeError(f"the image is {image.GetDimension()}D; H-SAM needs one 3D volume")
    unit = _direction_matrix(image)
    patient_axis, signs = nearest_patient_axes(unit)
    size_ijk = image.GetSize()
    spacing_ijk = image.GetSpacing()
    input_shape = (int(size_ijk[2]), int(size_ijk[1]), int(size_ijk[0]))
    voxel_of_patient = {patient_axis[a]: a for a in range(3)}

    permutation, flips, spacing = [], [], []
    for letter in spec.code:
        axis, sign = letter_axis_sign(letter)
        a = voxel_of_patient[axis]
        permutation.append(2 - a)
        flips.append(signs[a] != sign)
        spacing.append(float(spacing_ijk[a]))

    slice_axis, _ = letter_axis_sign(spec.slice)
    flat = [a for a in range(3) if size_ijk[a] == 1]
    if len(flat) >= 2:
        raise InputVolumeError(f"the image has size {tuple(size_ijk)} (i×j×k): only one axis has more than one "
                               "voxel, so it is a line, not a volume; give a 3D volume")
    if flat and patient_axis[flat[0]] != slice_axis:
        raise InputVolumeError(
            f"the image is a single {_PLANE_OF_AXIS[patient_axis[flat[0]]]} slice (size {tuple(size_ijk)}, i×j×k), "
            f"but the model segments {_PLANE_OF_AXIS[slice_axis]} slices, so it cannot take this slice's plane; "
            f"give the whole volume, or a single {_PLANE_OF_AXIS[slice_axis]} slice")

    codes = "".join(axis_sign_letter(patient_axis[a], signs[a]) for a in range(3))
    return Reorientation(permutation=tuple(permutation), flips=tuple(flips), input_shape=input_shape,
                         spacing=ModelSpacing(*spacing), input_axis_codes=codes, model_code=spec.code,
                         obliqueness=_obliqueness(unit, patient_axis))


def model_spacing(image: sitk.Image, spec: OrientationSpec) -> ModelSpacing:
    """Spacing in mm along the model's (slices, rows, columns) for ``image``."""
    return reorientation_for(image, spec).spacing


def labels_to_image(labels_kji: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 label image from a ``(k, j, i)`` array, with ``reference``'s geometry copied exactly.

    The values must be integers in 0..255 (float arrays holding whole numbers are accepted).
    """
    labels_kji = np.asarray(labels_kji)
    expected = tuple(reversed(reference.GetSize()))
    if labels_kji.shape != expected:
        raise ValueError(f"label array shape {labels_kji.shape} does not match the reference volume "
                         f"{expected} (k, j, i)")
    if labels_kji.dtype != np.uint8:
        if labels_kji.dtype.kind not in "biuf":
            raise ValueError(f"label array dtype {labels_kji.dtype} is not numeric")
        if labels_kji.size:
            lo, hi = labels_kji.min(), labels_kji.max()
            if lo < 0 or hi > 255:
                raise ValueError(f"label values must lie in 0..255, got {lo}..{hi}")
            if labels_kji.dtype.kind == "f" and not np.array_equal(labels_kji, np.round(labels_kji)):
                raise ValueError("label array holds non-integer values")
        labels_kji = labels_kji.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels_kji), isVector=False)
    image.SetOrigin(reference.GetOrigin())
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    return image
