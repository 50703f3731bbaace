"""Intensity preprocessing: raw voxel values → the network's float32 input in [0, 1].

Pure numpy. Fit once per volume (``IntensityNormalizer.fit``), then apply to batches of slices
``(n, rows, columns)`` (any shape works: the mapping is voxel-wise).

* ``window`` (e.g. CT HU [-125, 275] as H-SAM is trained): clip to [low, high], then (x - low) / (high - low).
* ``percentile`` (e.g. MR): low/high are the given percentiles of the volume's foreground voxels, i.e.
  voxels above the volume's minimum (all voxels if none are); then the same clip and scale.
  If the two percentiles coincide (a zero range), the output is a step: 0 at or below ``low``, 1 above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..description import IntensitySpec


@dataclass(frozen=True)
class IntensityNormalizer:
    """A fitted intensity mapping. ``low``/``high`` are in raw voxel units (HU for CT)."""

    spec: IntensitySpec
    low: float
    high: float

    @classmethod
    def fit(cls, volume: np.ndarray, spec: IntensitySpec) -> "IntensityNormalizer":
        """Fit to one volume (any shape, e.g. ``(k, j, i)``). ``window`` ignores the volume's values."""
        if spec.kind == "window":
            return cls(spec=spec, low=float(spec.low), high=float(spec.high))
        volume = np.asarray(volume)
        if volume.size == 0:
            raise ValueError("cannot fit percentile normalisation to an empty volume")
        values = volume.reshape(-1)
        foreground = values[values > values.min()]
        if foreground.size == 0:
            foreground = values
        low, high = np.percentile(foreground.astype(np.float64, copy=False), [spec.low, spec.high])
        return cls(spec=spec, low=float(low), high=float(high))

    @property
    def has_range(self) -> bool:
        """False when low and high coincide in float32 (the output is then a 0/1 step at ``low``)."""
        return bool(np.float32(self.high) > np.float32(self.low))

    def apply(self, slices: np.ndarray) -> np.ndarray:
        """Map raw values to float32 in [0, 1]; same shape as ``slices`` (e.g. ``(n, rows, columns)``)."""
        x = np.asarray(slices)
        low, high = np.float32(self.low), np.float32(self.high)
        if not self.has_range:
            return (x > self.low).astype(np.float32)
        out = np.array(x, dtype=np.float32, copy=True)
        np.clip(out, low, high, out=out)
        out -= low
        out /= high - low  # numerator <= denominator in float32, so the result never exceeds 1
        np.clip(out, 0.0, 1.0, out=out)
        return out

    def describe(self) -> str:
        """One line for logs, e.g. ``window [-125, 275]``."""
        if self.spec.kind == "window":
            return f"window [{self.low:g}, {self.high:g}]"
        return (f"percentiles {self.spec.low:g}-{self.spec.high:g} of foreground → "
                f"[{self.low:.6g}, {self.high:.6g}]")
