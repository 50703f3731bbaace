"""One volume in, one label map out: the data flow of "Segment organs".

volume → checks → the model's slice orientation → air-only slices found on the raw intensities
(``hsam.engine.air``; optional) → intensity preprocessing → batched H-SAM (streamed, air-only slices left out
and labelled background) → label values → the input's exact voxel grid → (optionally) a file written
atomically.

Skipped slices are recorded: ``SegmentationResult.skipped_slices`` (indices along the voxel axis the model
slices, ``skipped_axis``, usually k), a line in ``warnings`` (which the CLI prints and the worker's result
carries) and, in files written by ``segment_file``, the header field ``HSAM_AirSlicesSkipped``.

``stage_seconds``: pass a dict to have it filled with wall seconds per stage — ``io`` (read + write, by
``segment_file``), ``setup`` (the segmenter's model copy), ``preprocess`` (checks, reorientation, air test,
normalisation, and per batch resizing to the model input), ``encoder``, ``decoders``, ``postprocess`` (per
batch logits → labels, then label values and the input grid) — as ``hsam bench`` reports them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.labels import LabelSet
from ..description import OrientationSpec

log = logging.getLogger("hsam")

ProgressCallback = Callable[[int, int], None]


@dataclass
class SegmentationResult:
    """``labels``: SimpleITK uint8 image of label values on the input's grid."""

    labels: object
    labelset: LabelSet
    model_name: str
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped_slices: list[int] = field(default_factory=list)
    skipped_axis: str = "k"
    engine: dict = field(default_factory=dict)  # how it ran: device, dtype (fp32/bf16/fp16/int8), batch_size

    def present_classes(self) -> list[str]:
        import SimpleITK as sitk

        values = set(np.unique(sitk.GetArrayViewFromImage(self.labels)).tolist())
        return [c.name for c in self.labelset.classes if c.value in values]


def segment_image(image, loaded, *, device: str = "auto", batch_size: int | None = None,
                  precision: str = "auto", orientation: OrientationSpec | None = None,
                  authors_roundtrip: int | None = None, progress: ProgressCallback | None = None,
                  cancel=None, skip_air: bool | None = None, stage_seconds: dict | None = None) -> SegmentationResult:
    """Segment a SimpleITK image with a ``LoadedModel``; nothing is written.

    ``skip_air``: leave air-only slices out of the model and label them background (``None``: the measured
    default ``hsam.engine.air.SKIP_AIR_DEFAULT``)."""
    import SimpleITK as sitk

    from ..data.intensity import IntensityNormalizer
    from ..data.orientation import labels_to_image, reorientation_for
    from ..data.volume import check_image
    from .air import SKIP_AIR_DEFAULT, air_slices, body_threshold
    from .inference import SliceSegmenter, StageTimer

    started = time.perf_counter()
    stages = stage_seconds if stage_seconds is not None else {}
    loaded.require_trained()
    desc = loaded.description
    warnings = check_image(image, modality=desc.intensity.modality)
    spec = orientation or desc.orientation
    reorient = reorientation_for(image, spec)
    warnings += reorient.warnings
    if not spec.verified:
        log.info("model orientation %s is an assumption (%s)", spec.code, spec.source)
    for text in warnings:
        log.warning(text)
    volume = sitk.GetArrayViewFromImage(image)
    normalizer = IntensityNormalizer.fit(volume, desc.intensity)
    raw = reorient.to_model(volume)
    skip = None
    if SKIP_AIR_DEFAULT if skip_air is None else skip_air:
        skip = air_slices(raw, body_threshold(normalizer))
    log.info("%d slices of %d×%d, intensity %s", *raw.shape, normalizer.describe())
    skipped = _record_skipped(skip, reorient, body_threshold(normalizer), warnings)
    _add(stages, "preprocess", time.perf_counter() - started)

    mark = time.perf_counter()
    segmenter = SliceSegmenter(loaded.model, desc.num_classes, desc.image_size, device=device,
                               batch_size=batch_size, precision=precision, authors_roundtrip=authors_roundtrip)
    _add(stages, "setup", time.perf_counter() - mark)
    if stage_seconds is not None:
        segmenter.timer = StageTimer()
    indices = segmenter.segment(raw, progress=progress, cancel=cancel, skip=skip, normalize=normalizer.apply)
    del raw
    if segmenter.timer is not None:
        for name, seconds in segmenter.timer.seconds.items():
            _add(stages, name, seconds)

    mark = time.perf_counter()
    lut = np.asarray(desc.labels.index_to_value_lut(), dtype=np.uint8)
    for start in range(0, len(indices), 16):  # class index → label value in place: no extra volume-sized copy
        indices[start:start + 16] = lut[indices[start:start + 16]]
    ordered = reorient.to_input(indices)
    del indices
    labels = labels_to_image(ordered, image)
    del ordered
    _add(stages, "postprocess", time.perf_counter() - mark)
    engine = {"device": str(segmenter.device), "batch_size": segmenter.batch_size,
              "dtype": "int8" if segmenter.int8 else
              {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(segmenter.dtype), "fp32")}
    return SegmentationResult(labels, desc.labels, desc.name, warnings, time.perf_counter() - started,
                              skipped_slices=skipped, skipped_axis="ijk"[reorient.slice_voxel_axis], engine=engine)


def _add(stages: dict, name: str, seconds: float) -> None:
    stages[name] = stages.get(name, 0.0) + seconds


def _record_skipped(skip, reorient, threshold: float, warnings: list[str]) -> list[int]:
    """The skipped model slices as indices along the input's voxel axis (sorted); adds the warning line."""
    from .air import AIR_MAX_BODY_FRACTION, index_ranges

    if skip is None or not skip.any():
        return []
    n = len(skip)
    model_indices = np.flatnonzero(skip)
    skipped = sorted(int(n - 1 - m) if reorient.flips[0] else int(m) for m in model_indices)
    axis = "ijk"[reorient.slice_voxel_axis]
    text = (f"{len(skipped)} of {n} slices contain only air (fewer than {AIR_MAX_BODY_FRACTION:.1%} of their voxels "
            f"above {threshold:g}) and were labelled background without running the model: {axis} = "
            f"{index_ranges(skipped)} (hsam segment --no-skip-air runs the model on every slice)")
    log.warning(text)
    warnings.append(text)
    return skipped


def segment_file(input_path: str | Path, output_path: str | Path, loaded, **options) -> SegmentationResult:
    """Read ``input_path`` (NIfTI/NRRD/MHA, a DICOM folder, an InVesalius .inv3), segment, write ``output_path`` atomically
    (``.seg.nrrd`` with segment names/colours/terminology, else a label map). On any error or cancel no
    output file is left behind and an existing one is untouched."""
    from ..data.segfile import write_segmentation

    from ..data.volume import read_image

    stages = options.get("stage_seconds")
    stages = stages if stages is not None else {}
    mark = time.perf_counter()
    image = read_image(input_path)
    _add(stages, "io", time.perf_counter() - mark)
    result = segment_image(image, loaded, **options)
    mark = time.perf_counter()
    extra = {"HSAM_Model": result.model_name}
    if result.skipped_slices:
        from .air import index_ranges

        extra["HSAM_AirSlicesSkipped"] = f"{result.skipped_axis} = {index_ranges(result.skipped_slices)}"
    write_segmentation(result.labels, result.labelset, output_path, extra_metadata=extra)
    _add(stages, "io", time.perf_counter() - mark)
    return result
