"""One volume in, one label map out: the data flow of "Segment organs".

volume → checks → the model's slice orientation → intensity preprocessing → batched H-SAM (streamed)
→ label values → the input's exact voxel grid → (optionally) a file written atomically.
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

    def present_classes(self) -> list[str]:
        import SimpleITK as sitk

        values = set(np.unique(sitk.GetArrayViewFromImage(self.labels)).tolist())
        return [c.name for c in self.labelset.classes if c.value in values]


def segment_image(image, loaded, *, device: str = "auto", batch_size: int | None = None,
                  precision: str = "auto", orientation: OrientationSpec | None = None,
                  authors_roundtrip: int | None = None, progress: ProgressCallback | None = None,
                  cancel=None) -> SegmentationResult:
    """Segment a SimpleITK image with a ``LoadedModel``; nothing is written."""
    import SimpleITK as sitk

    from ..data.intensity import IntensityNormalizer
    from ..data.orientation import labels_to_image, reorientation_for
    from ..data.volume import check_image
    from .inference import SliceSegmenter

    started = time.perf_counter()
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
    slices = normalizer.apply(reorient.to_model(volume))
    log.info("%d slices of %d×%d, intensity %s", *slices.shape, normalizer.describe())
    segmenter = SliceSegmenter(loaded.model, desc.num_classes, desc.image_size, device=device,
                               batch_size=batch_size, precision=precision, authors_roundtrip=authors_roundtrip)
    indices = segmenter.segment(slices, progress=progress, cancel=cancel)
    del slices
    lut = np.asarray(desc.labels.index_to_value_lut(), dtype=np.uint8)
    labels = labels_to_image(reorient.to_input(lut[indices]), image)
    return SegmentationResult(labels, desc.labels, desc.name, warnings, time.perf_counter() - started)


def segment_file(input_path: str | Path, output_path: str | Path, loaded, **options) -> SegmentationResult:
    """Read ``input_path`` (NIfTI/NRRD/MHA, a DICOM folder, an InVesalius .inv3), segment, write ``output_path`` atomically
    (``.seg.nrrd`` with segment names/colours/terminology, else a label map). On any error or cancel no
    output file is left behind and an existing one is untouched."""
    from ..data.segfile import write_segmentation

    from ..data.volume import read_image

    image = read_image(input_path)
    result = segment_image(image, loaded, **options)
    write_segmentation(result.labels, result.labelset, output_path,
                       extra_metadata={"HSAM_Model": result.model_name})
    return result

