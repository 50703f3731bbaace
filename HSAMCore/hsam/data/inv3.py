"""Read an InVesalius 3 project (``.inv3``) as a SimpleITK image.

An ``.inv3`` file is a gzip-compressed tar holding ``main.plist`` (shape, dtype, spacing, modality) and
the raw voxel matrix (``matrix.dat``, C order, shape (slices, rows, columns), CT in HU). InVesalius keeps
no patient-space direction in the project; the stack is returned with an identity direction (slices along
k), which is how InVesalius displays it. Masks in the project are intensity thresholds, not expert labels,
and are not read.
"""

from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path

import numpy as np

from ..errors import InputVolumeError


def read_inv3(path: str | Path):
    """``.inv3`` → SimpleITK image (int16 HU for CT), spacing from the project."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise InputVolumeError(f"{path.name} is not an InVesalius project: no main.plist inside")
            meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = meta["matrix"]
            name = Path(matrix["filename"]).name
            if name not in members:
                raise InputVolumeError(f"{path.name}: the voxel matrix {name} named by main.plist is missing")
            raw = tar.extractfile(members[name]).read()
    except (tarfile.TarError, OSError, EOFError, plistlib.InvalidFileException, KeyError) as exc:
        raise InputVolumeError(f"cannot read InVesalius project {path}: {exc}") from exc
    shape = tuple(int(s) for s in matrix["shape"])
    dtype = np.dtype(matrix.get("dtype", "int16"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise InputVolumeError(f"{path.name}: voxel matrix has {len(raw)} bytes, expected {expected} for "
                               f"shape {shape} {dtype}; the project is truncated or damaged")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in meta.get("spacing", (1.0, 1.0, 1.0))))
    image.SetMetaData("modality", str(meta.get("modality", "")))
    return image
