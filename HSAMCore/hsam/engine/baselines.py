"""What a Slicer user would do without a model, given the same labelled slices: copy the nearest labelled
slice, or Slicer's "Fill between slices" (ITK morphological contour interpolation, Albu et al. 2008 as
implemented by Zukić et al., Insight Journal 2016; PyPI ``itk-morphologicalcontourinterpolation``).

Arrays are ``(k, j, i)`` label maps; "slices" are k planes. No torch here.

The ITK filter runs in a child process (``python -m hsam.engine.baselines``): ITK's Python wrapping and
SimpleITK in one interpreter have crashed at exit here, and a crash must not take the caller with it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import HSAMError

ITK_PACKAGE = "itk-morphologicalcontourinterpolation"


def nearest_copy(labels: np.ndarray, given: Sequence[int], targets: Sequence[int] | None = None) -> np.ndarray:
    """Every target k plane (default: all) gets the labels of the nearest given plane (the lower one on a tie).
    Given planes keep their labels."""
    labels = np.asarray(labels)
    given_arr = np.asarray(sorted(set(int(k) for k in given)))
    if not len(given_arr):
        raise HSAMError("nearest-slice copy needs at least one labelled slice")
    out = np.zeros_like(labels)
    out[given_arr] = labels[given_arr]
    for k in (range(labels.shape[0]) if targets is None else targets):
        nearest = given_arr[np.argmin(np.abs(given_arr - int(k)))]
        out[int(k)] = labels[nearest]
    return out


def contour_interpolation_available() -> bool:
    """Whether ITK's morphological contour interpolation can be imported here (without importing it)."""
    return importlib.util.find_spec("itk") is not None and (
        importlib.util.find_spec("itk.MorphologicalContourInterpolationPython") is not None
        or _has_mci_module())


def _has_mci_module() -> bool:
    spec = importlib.util.find_spec("itk")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        if any(Path(folder).glob("*MorphologicalContourInterpolation*")):
            return True
    return False


def _interpolate_in_process(sparse: np.ndarray) -> np.ndarray:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(sparse.astype(np.uint8)))
    interpolator = itk.MorphologicalContourInterpolator.New(image)
    interpolator.SetAxis(2)  # ITK axis 2 = k (the array's first axis)
    interpolator.Update()
    return np.asarray(itk.array_from_image(interpolator.GetOutput())).astype(np.uint8)


def contour_interpolation(labels: np.ndarray, given: Sequence[int], timeout: float = 600) -> np.ndarray:
    """Labels of the ``given`` k planes (others empty) interpolated along k by ITK's morphological contour
    interpolation (each label separately, as Slicer's Fill between slices). Planes outside the given range stay
    empty. Raises HSAMError if the package is missing or the filter fails."""
    labels = np.asarray(labels)
    sparse = np.zeros(labels.shape, dtype=np.uint8)
    keep = sorted(set(int(k) for k in given))
    sparse[keep] = labels[keep]
    if not contour_interpolation_available():
        raise HSAMError(f"contour interpolation needs the Python package {ITK_PACKAGE} "
                        f"(pip install {ITK_PACKAGE})")
    with tempfile.TemporaryDirectory(prefix="hsam-mci-") as tmp:
        src, dst = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(src, sparse)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
        proc = subprocess.run([sys.executable, "-m", "hsam.engine.baselines", str(src), str(dst)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if not dst.is_file():
            raise HSAMError(f"ITK contour interpolation failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        out = np.load(dst)
    out[keep] = labels[keep]
    return out


def _main(argv: list[str]) -> int:  # pragma: no cover - runs in the child process
    src, dst = argv
    result = _interpolate_in_process(np.load(src))
    tmp = dst + ".tmp.npy"
    np.save(tmp, result)
    os.replace(tmp, dst)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (ITK's wrapping can crash there)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))
