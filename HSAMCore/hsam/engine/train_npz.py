"""Training data in TransUNet's Synapse layout (what SAMed and H-SAM train on): a folder of
``caseXXXX_sliceYYY.npz`` files (``train_npz/``), one axial slice each, already preprocessed by the authors'
script — ``image`` float in [0, 1] (CT clipped to [-125, 275] HU and scaled), ``label`` class indices in the
Synapse order (1 spleen … 8 pancreas; hsam's ``synapse-8-organs`` label set), both 512×512 and in the array
orientation the published model was trained with, which is the model's slice orientation by definition. So the
slices are used as they are: no reorientation and no intensity normalisation, only the bilinear resize to the
model's input (labels: nearest), as for every other dataset.

Slice selection follows :func:`hsam.engine.train.select_slices` with each case as a "volume" of its slices
(H-SAM's 10 %: 221 of 2,211). The files are read with ``allow_pickle=False`` (an ``.npz`` holding Python objects is
refused, never unpickled).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import InputVolumeError

NPZ_NAME = re.compile(r"^(?P<case>.+?)_slice(?P<k>\d+)\.npz$")


def npz_folder(data) -> Path | None:
    """The folder of slice files if ``data`` is one (or holds ``train_npz/``), else None."""
    path = Path(str(data)).expanduser()
    if not path.is_dir():
        return None
    if any(path.glob("*.npz")):
        return path
    if (path / "train_npz").is_dir() and any((path / "train_npz").glob("*.npz")):
        return path / "train_npz"
    return None


def npz_cases(folder: Path) -> dict[str, list[Path]]:
    """{case: its slice files in slice order}; every ``.npz`` must be named ``<case>_slice<N>.npz``."""
    cases: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.glob("*.npz")):
        match = NPZ_NAME.match(path.name)
        if match is None:
            from .train import TrainError

            raise TrainError(f"{path.name} is not named like TransUNet's slices (<case>_slice<N>.npz, e.g. "
                             "case0005_slice012.npz)")
        cases.setdefault(match.group("case"), []).append((int(match.group("k")), path))
    return {case: [p for _, p in sorted(items)] for case, items in sorted(cases.items())}


def read_npz_slice(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W) float32, label (H, W) int64) of one slice file, checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "image" not in data.files or "label" not in data.files:
                raise InputVolumeError(f"{path.name} has no 'image' and 'label' arrays (it has {data.files})")
            image = np.asarray(data["image"], dtype=np.float32)
            label = np.asarray(data["label"])
    except ValueError as exc:  # object arrays need pickle: refused
        raise InputVolumeError(f"{path.name} cannot be read safely ({exc})") from exc
    except OSError as exc:
        raise InputVolumeError(f"{path.name} is not a readable .npz file ({exc})") from exc
    if image.ndim != 2 or image.shape != label.shape:
        raise InputVolumeError(f"{path.name}: image {image.shape} and label {label.shape} must be one 2D slice each")
    if not np.isfinite(image).all():
        raise InputVolumeError(f"{path.name}: the image holds NaN or infinite values")
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        raise InputVolumeError(f"{path.name}: the label holds non-integer values")
    return image, label.astype(np.int64)


def load_npz_dataset(dataset, folder: Path, description, labelset) -> None:
    """Fill a :class:`hsam.engine.train.SliceDataset` (``dataset``, whose ``fraction``/``seed`` are set) from
    ``folder``: ``pairs``, ``depths``, ``entries``, ``images`` (n, S, S), ``targets`` (n, S, S), ``warnings``."""
    from .embeddings import labels_to_model, model_inputs
    from .train import VolumePair, select_slices

    cases = npz_cases(folder)
    if not cases:
        raise InputVolumeError(f"{folder} holds no .npz slices")
    names = list(cases)
    dataset.pairs = [VolumePair(str(folder / f"{case}_slice*.npz"), "") for case in names]
    dataset.depths = [len(cases[c]) for c in names]
    dataset.entries = select_slices(dataset.depths, dataset.fraction, dataset.seed)
    lut = np.zeros(256, dtype=np.uint8)
    for index, value in enumerate(labelset.index_to_value_lut()):
        lut[value] = index
    known = set(labelset.index_to_value_lut())
    images, labels, outside, unknown = [], [], 0, set()
    for v, k in dataset.entries:
        image, label = read_npz_slice(cases[names[v]][k])
        outside += int(((image < -0.01) | (image > 1.01)).any())
        if label.size and (label.min() < 0 or label.max() > 255):
            raise InputVolumeError(f"{cases[names[v]][k].name}: label values outside 0..255")
        unknown |= set(np.unique(label).tolist()) - known
        images.append(image)
        labels.append(lut[label])
    if len({im.shape for im in images}) > 1:
        raise InputVolumeError(f"the slices of {folder} differ in size: {sorted({im.shape for im in images})}")
    if outside:
        dataset.warnings.append(f"{outside} slices have intensities outside [0, 1]: TransUNet's .npz slices are "
                                "normalised already; these were not")
    if unknown:
        dataset.warnings.append(f"label values {sorted(unknown)} are not in the label set {labelset.name!r}: trained "
                                "as background")
    dataset.images = model_inputs(np.stack(images), dataset.image_size)[:, 0].contiguous()
    import torch

    dataset.targets = labels_to_model(np.stack(labels), dataset.image_size).to(torch.uint8)
