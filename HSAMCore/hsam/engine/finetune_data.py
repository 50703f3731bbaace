"""Fine-tuning inputs: the corrected slices of a volume in the model's space, and their embeddings.

The corrected slices are k planes of the image (its third voxel axis, as ``hsam finetune --slices`` numbers
them). They go through inference's path — the model's slice orientation, its intensity preprocessing — and
their label values become class indices of the label set. Every check that can fail on user input is here,
with a message that says what to do; nothing the caller passed in is modified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..data.labels import LabelSet
from ..errors import InputVolumeError


def parse_slice_spec(spec: str | Sequence[int]) -> list[int]:
    """``"0,10,20-25"`` → ``[0, 10, 20, 21, 22, 23, 24, 25]`` (sorted, unique). Ranges are inclusive."""
    if not isinstance(spec, str):
        return sorted({int(s) for s in spec})
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise InputVolumeError(f"cannot read the slice list {spec!r}: {part!r} is not a slice number or a range "
                                   "like 20-25 (write e.g. 0,10,20-25)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InputVolumeError(f"slice range {part!r} runs backwards: write it as {last}-{first}")
        out.update(range(first, last + 1))
    if not out:
        raise InputVolumeError("no corrected slice was given: list the slices whose labels you corrected "
                               "(e.g. --slices 0,10,20-25)")
    return sorted(out)


@dataclass
class CorrectedSlices:
    """The corrected slices in model space: k indices, model slice indices, normalised images (n, H, W) in [0, 1]
    and class-index labels (n, H, W) uint8."""

    k_indices: list[int]
    model_indices: list[int]
    images: np.ndarray
    targets: np.ndarray
    volume_fingerprint: str
    preprocessing: dict
    warnings: list[str]


def _labels_array(labels, image) -> np.ndarray:
    import SimpleITK as sitk

    expected = tuple(reversed(image.GetSize()))
    if isinstance(labels, sitk.Image):
        from ..data.segfile import grid_difference

        difference = grid_difference(labels, image)
        if difference:
            raise InputVolumeError(f"the label map is not on the image's voxel grid: {difference}. Resample it to the "
                                   "image with nearest-neighbour interpolation, or export the segmentation with the "
                                   "image as reference")
        if labels.GetNumberOfComponentsPerPixel() != 1:
            raise InputVolumeError("the label map has several values per voxel; give one label value per voxel")
        labels = sitk.GetArrayViewFromImage(labels)
    array = np.asarray(labels)
    if array.shape != expected:
        raise InputVolumeError(f"the label map has shape {array.shape} (k, j, i) but the image has {expected}: the "
                               "labels are not on the image's voxel grid. Resample them to the image (nearest "
                               "neighbour) or export the segmentation with the image as reference")
    if array.dtype.kind not in "biuf":
        raise InputVolumeError(f"the label map holds {array.dtype} values, not label numbers")
    return array


def prepare_corrected_slices(image, labels, k_indices: Sequence[int], description, labelset: LabelSet
                             ) -> CorrectedSlices:
    """Check the inputs and bring the corrected slices into the model's space (nothing is modified)."""
    import SimpleITK as sitk

    from ..data.orientation import reorientation_for
    from ..data.volume import check_image

    if not isinstance(image, sitk.Image):
        raise InputVolumeError(f"the image must be a SimpleITK image, got {type(image).__name__}")
    warnings = check_image(image, modality=description.intensity.modality)
    reorient = reorientation_for(image, description.orientation)
    warnings += reorient.warnings
    array = _labels_array(labels, image)
    k_indices = parse_slice_spec(list(k_indices)) if len(k_indices) else []
    if not k_indices:
        raise InputVolumeError("no corrected slice was given: list the slices whose labels you corrected "
                               "(e.g. --slices 0,10,20-25)")
    depth = array.shape[0]
    outside = [k for k in k_indices if not 0 <= k < depth]
    if outside:
        raise InputVolumeError(f"slice indices {outside} lie outside the volume: along its third voxel axis (k) it has "
                               f"{depth} slices, numbered 0..{depth - 1}")
    try:
        model_indices = [reorient.model_slice_index(k, voxel_axis=2) for k in k_indices]
    except ValueError:
        plane = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
        axis = "ijk"[reorient.slice_voxel_axis]
        raise InputVolumeError(
            f"the corrected slices are numbered along the image's third voxel axis (k), but the model segments "
            f"{plane[description.orientation.slice]} slices, which lie along this volume's {axis} axis: the k planes "
            "are not the model's slices. Correct slices of the model's plane, or resample the volume so that its "
            "k axis is the model's slice axis") from None

    lut = np.full(256, -1, dtype=np.int16)
    for index, value in enumerate(labelset.index_to_value_lut()):
        lut[value] = index
    raw = np.stack([array[k] for k in k_indices])
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise InputVolumeError("the label map holds non-integer values: it is not a label map (was it resampled "
                               "with linear interpolation? use nearest neighbour for labels)")
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise InputVolumeError(f"the label map holds values {raw.min()}..{raw.max()}; label values must lie in 0..255")
    raw = raw.astype(np.int64)
    bad = sorted(set(np.unique(raw).tolist()) - set(labelset.index_to_value_lut()))
    if bad:
        where = sorted({k for k, sl in zip(k_indices, raw) if np.isin(sl, bad).any()})
        raise InputVolumeError(
            f"label values {bad} (in corrected slices {where[:10]}{' …' if len(where) > 10 else ''}) are not in the "
            f"label set {labelset.name!r}, whose values are {list(labelset.values)}: relabel those voxels, or give a "
            "label table that names every value (hsam finetune --labels TABLE)")
    if not (raw > 0).any():
        raise InputVolumeError(f"the corrected slices {k_indices[:10]} hold no labelled voxel (all background): "
                               "there is nothing to learn; label the structures on them first")

    images, _, preprocessing, fingerprint = slice_inputs(image, description, k_indices, reorient)
    # labels into model space: to_model needs the full stack, so place the slices in one
    label_stack = np.zeros(array.shape, dtype=np.uint8)
    for k, sl in zip(k_indices, raw):
        label_stack[k] = lut[sl].astype(np.uint8)
    targets = reorient.to_model(label_stack)[model_indices]
    return CorrectedSlices(k_indices=list(k_indices), model_indices=model_indices, images=images,
                           targets=targets, volume_fingerprint=fingerprint, preprocessing=preprocessing,
                           warnings=warnings)


def slice_inputs(image, description, k_indices: Sequence[int], reorient=None):
    """Normalised slices (n, H, W) in [0, 1] of the k planes ``k_indices`` in the model's orientation, with their
    model slice indices, the preprocessing record and the volume's fingerprint (the embedding cache's keys)."""
    import SimpleITK as sitk

    from ..data.intensity import IntensityNormalizer
    from ..data.orientation import reorientation_for
    from .embeddings import array_fingerprint

    reorient = reorient or reorientation_for(image, description.orientation)
    volume = sitk.GetArrayViewFromImage(image)
    normalizer = IntensityNormalizer.fit(volume, description.intensity)
    model_indices = [reorient.model_slice_index(int(k), voxel_axis=2) for k in k_indices]
    model_volume = reorient.to_model(volume)
    images = normalizer.apply(model_volume[model_indices])
    preprocessing = {"orientation": reorient.model_code, "permutation": list(reorient.permutation),
                     "flips": [bool(f) for f in reorient.flips], "intensity": normalizer.spec.to_json(),
                     "intensity_range": [normalizer.low, normalizer.high], "image_size": description.image_size}
    return images, model_indices, preprocessing, array_fingerprint(np.asarray(volume))[:32]


def embedding_cache_for(model, volume_fingerprint: str, preprocessing: dict, dtype, disk: bool = True):
    """The embedding cache of ``model``'s encoder for one volume and preprocessing (shared by fine-tuning,
    the benchmark and the demo, so each slice is encoded once)."""
    from .embeddings import EmbeddingCache, module_fingerprint

    return EmbeddingCache({"encoder": module_fingerprint(model.image_encoder)[:32], "volume": volume_fingerprint,
                           "preprocessing": preprocessing, "precision": "fp32" if dtype is None else str(dtype)},
                          disk=disk)


def embed_slices(model, image, description, k_indices: Sequence[int], *, device="cpu", dtype=None, cache: bool = True,
                 batch_size: int = 4, progress: Callable[[int, int], None] | None = None, cancel=None):
    """Embeddings (n, C, g, g) of the k planes ``k_indices`` of ``image`` (cached, see
    :mod:`hsam.engine.embeddings`)."""
    import torch

    from .embeddings import SliceEncoder, compute_embeddings

    images, model_indices, preprocessing, fingerprint = slice_inputs(image, description, k_indices)
    store = embedding_cache_for(model, fingerprint, preprocessing, dtype, disk=cache)
    encoder = SliceEncoder(model, torch.device(device), dtype)
    return compute_embeddings(encoder, images, model_indices, description.image_size, store, batch_size=batch_size,
                              progress=progress, cancel=cancel)


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions (0..n-1, slices in order) → (train, validation). With n >= 3 and ``fraction`` > 0,
    max(1, round(fraction·n)) positions spread evenly over the stack (seeded offset) are held out."""
    if n < 3 or fraction <= 0:
        return list(range(n)), []
    count = min(n - 2, max(1, round(fraction * n)))
    stride = n / count
    offset = np.random.default_rng(seed).uniform(0, stride)
    val = sorted({min(n - 1, int(offset + i * stride)) for i in range(count)})
    train = [i for i in range(n) if i not in val]
    return train, val
