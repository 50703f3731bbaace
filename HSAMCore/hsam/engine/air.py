"""Air-only slices: slices with no body in them, labelled background without running the model.

The test is on the raw intensities of the model-ordered stack, before normalisation, one slice at a time: a
slice is *air-only* when fewer than ``AIR_MAX_BODY_FRACTION`` (0.1 %) of its voxels are above the *body
threshold*; a slice with any NaN or infinite voxel is never air-only, so a broken slice still reaches the
input check.
The threshold comes from the model's ``IntensitySpec`` and the normaliser fitted to the volume:

* ``window`` models: the window's low end (everything at or below it is 0 in the model input), lowered to
  ``AIR_CT_HU`` (−500 HU) for CT models, so that skin, fat and partial-volume voxels at the body surface
  (−500…−125 HU) count as body although the window maps them to 0 — only air (≈ −1000 HU) is air.
* ``percentile`` models (MR): the fitted low percentile of the volume's foreground (also mapped to 0).

So a skipped slice is one the model would see as an (almost) blank image. Whether the model labels such an image
background is the model's business: measured on the Debian Colin27 MR and Cranium CT (BENCHMARKS.md, "Air-only
slices"), a LiteMedSAM fine-tuned on Colin27 put brain structures on its six air slices above the head, so
skipping (which removes exactly those false positives) agrees with the full path on 99.62 % of the voxels but
with a per-class Dice of 0.969 — below the fast-path gate's 0.99. Hence ``SKIP_AIR_DEFAULT = False``: skipping
is opt-in (``skip_air=True``, ``hsam segment --skip-air``).

Cost: one comparison per voxel (≈ 0.1 s for 512×512×200 on one core), against ≈ 1.4 s of model per slice on a
CPU.
"""

from __future__ import annotations

import numpy as np

from ..data.intensity import IntensityNormalizer

AIR_CT_HU = -500.0
AIR_MAX_BODY_FRACTION = 1e-3
# Whether ``hsam segment``/the worker skip air-only slices unless told otherwise. Measured decision (the gate
# fails on Colin27 with a fine-tuned LiteMedSAM): see the module docstring and BENCHMARKS.md.
SKIP_AIR_DEFAULT = False


def body_threshold(normalizer: IntensityNormalizer) -> float:
    """The raw intensity above which a voxel counts as body (see the module docstring)."""
    spec = normalizer.spec
    if spec.kind == "window" and spec.modality.upper() == "CT":
        return min(float(normalizer.low), AIR_CT_HU)
    return float(normalizer.low)


def air_slices(raw_slices: np.ndarray, threshold: float, max_fraction: float = AIR_MAX_BODY_FRACTION) -> np.ndarray:
    """(n,) booleans: which slices of ``raw_slices`` (n, H, W) have fewer than ``max_fraction`` of their voxels
    above ``threshold`` and no NaN or infinite voxel."""
    raw_slices = np.asarray(raw_slices)
    n = raw_slices.shape[0]
    per_slice = int(np.prod(raw_slices.shape[1:], dtype=np.int64))
    limit = max_fraction * per_slice
    out = np.zeros(n, dtype=bool)
    for k in range(n):  # one slice at a time: no volume-sized temporary
        body = per_slice - int(np.count_nonzero(raw_slices[k] <= threshold))
        out[k] = body < limit and bool(np.isfinite(raw_slices[k]).all())
    return out


def index_ranges(indices) -> str:
    """``[0, 1, 2, 7, 9, 10]`` → ``"0-2, 7, 9-10"``."""
    values = sorted(int(i) for i in indices)
    parts: list[str] = []
    start = prev = None
    for v in values + [None]:
        if start is not None and (v is None or v != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(parts)


__all__ = ["AIR_CT_HU", "AIR_MAX_BODY_FRACTION", "SKIP_AIR_DEFAULT", "air_slices", "body_threshold", "index_ranges"]
