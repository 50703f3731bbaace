"""Reading image volumes (NIfTI, NRRD, MetaImage, DICOM series) and checking they can be segmented.

Images are SimpleITK images: voxel axes (i, j, k), ``GetArrayFromImage`` gives ``(k, j, i)``, geometry in
LPS. Nothing here resamples or reorients; see :mod:`hsam.data.orientation` for that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputVolumeError

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".inv3")
SUPPORTED_TEXT = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), InVesalius (.inv3) or a "
                  "DICOM series folder")

# DICOM tags copied from the series onto the image's metadata (no patient identifiers).
DICOM_TAGS_KEPT = {"0008|0060": "Modality", "0020|000e": "SeriesInstanceUID", "0008|103e": "SeriesDescription"}
MODALITY_TAG = "0008|0060"
# Metadata key under which read_image leaves warnings about the read for check_image to report.
READ_WARNINGS_KEY = "HSAM_ReadWarnings"

_MAX_SUBFOLDERS_SEARCHED = 50


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]
    description: str = ""
    modality: str = ""

    @property
    def num_files(self) -> int:
        return len(self.files)


def _sitk_message(exc: Exception) -> str:
    """The informative last line of a SimpleITK/ITK exception."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """All DICOM series directly inside ``folder`` (not its subfolders), most files first."""
    folder = str(folder)
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as exc:
        raise InputVolumeError(f"cannot scan {folder} for DICOM files: {_sitk_message(exc)}") from exc
    series = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        description = modality = ""
        if files:
            try:
                head = sitk.ImageFileReader()
                head.SetFileName(files[0])
                head.ReadImageInformation()
                description = head.GetMetaData("0008|103e").strip() if head.HasMetaDataKey("0008|103e") else ""
                modality = head.GetMetaData(MODALITY_TAG).strip() if head.HasMetaDataKey(MODALITY_TAG) else ""
            except RuntimeError:
                pass
        series.append(DicomSeries(uid=uid, files=files, description=description, modality=modality))
    return sorted(series, key=lambda s: -s.num_files)


def _subfolders_with_series(folder: Path) -> list[str]:
    found = []
    for count, (root, _dirs, files) in enumerate(os.walk(folder)):
        if count > _MAX_SUBFOLDERS_SEARCHED:
            break
        if Path(root) == folder or not files:
            continue
        try:
            if sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
                found.append(os.path.relpath(root, folder))
        except RuntimeError:
            continue
    return found


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    series = list_dicom_series(folder)
    if not series:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if not entries:
            raise InputVolumeError(f"the folder {folder} is empty: give a folder holding one DICOM series, "
                                   f"or an image file ({SUPPORTED_TEXT})")
        hint = ""
        sub = _subfolders_with_series(folder)
        if sub:
            hint = f"; DICOM series were found in its subfolders {sub[:5]}: give one of those folders"
        raise InputVolumeError(f"no DICOM series found directly in {folder} ({len(entries)} entries){hint}. "
                               f"Give a DICOM series folder or an image file ({SUPPORTED_TEXT})")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            listing = ", ".join(f"{s.uid} ({s.num_files} files{', ' + s.description if s.description else ''})"
                                for s in series)
            raise InputVolumeError(f"the folder {folder} has no DICOM series with UID {series_uid}; "
                                   f"it holds: {listing}")
        chosen_series = chosen[0]
    else:
        chosen_series = series[0]  # most slices
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen_series.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputVolumeError(f"cannot read the DICOM series {chosen_series.uid} in {folder}: "
                               f"{_sitk_message(exc)}. The files may be damaged, compressed with an unsupported "
                               "codec, or not one image stack") from exc
    warnings = []
    if len(series) > 1 and series_uid is None:
        others = ", ".join(f"{s.uid} ({s.num_files} files)" for s in series[1:4])
        warnings.append(f"{folder} holds {len(series)} DICOM series; read {chosen_series.uid} "
                        f"({chosen_series.num_files} files, the most slices). Others: {others}. "
                        "Pass a series UID to choose another")
    for tag in DICOM_TAGS_KEPT:
        if reader.HasMetaDataKey(0, tag):
            image.SetMetaData(tag, reader.GetMetaData(0, tag).strip())
    gap = _slice_spacing_irregularity(reader, image)
    if gap:
        warnings.append(gap)
    if warnings:
        image.SetMetaData(READ_WARNINGS_KEY, "\n".join(warnings))
    return image


def _slice_spacing_irregularity(reader: sitk.ImageSeriesReader, image: sitk.Image) -> str:
    """A warning if the slice positions of a series are not evenly spaced (missing or uneven slices)."""
    n = image.GetSize()[2]
    if n < 3:
        return ""
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    positions = []
    for index in range(n):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return ""
        try:
            point = [float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")]
        except ValueError:
            return ""
        positions.append(float(np.dot(point, normal)))
    steps = np.diff(np.sort(positions))
    mean = float(np.mean(steps))
    if mean > 0 and float(np.max(np.abs(steps - mean))) > 0.01 * mean + 1e-3:
        return (f"the DICOM slices are not evenly spaced (steps {steps.min():.3g}..{steps.max():.3g} mm, "
                f"mean {mean:.3g} mm): slices may be missing. The volume is treated as evenly spaced, so "
                "positions along the slice axis may be off; check the series is complete")
    return ""


def read_image(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read a volume: NIfTI, NRRD, MetaImage (or anything SimpleITK reads) or a DICOM series folder.

    For a folder, the series with the most slices is read unless ``series_uid`` is given. A ``.dcm``
    file reads the series it belongs to (or ``series_uid``) from its folder. Notes about the read (several series,
    uneven slices) are kept in the image metadata under ``READ_WARNINGS_KEY`` for :func:`check_image`.

    Raises InputVolumeError for a missing path, an empty or non-DICOM folder, or an unreadable file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputVolumeError(f"{path} does not exist: check the path (give {SUPPORTED_TEXT})")
    if path.is_dir():
        return _read_dicom_folder(path, series_uid)
    if path.suffix.lower() == ".dcm":
        uid = series_uid
        if uid is None:
            try:
                head = sitk.ImageFileReader()
                head.SetFileName(str(path))
                head.ReadImageInformation()
                uid = head.GetMetaData("0020|000e").strip() if head.HasMetaDataKey("0020|000e") else None
            except RuntimeError:
                uid = None
        if uid:
            return _read_dicom_folder(path.parent, uid)
    if not os.access(path, os.R_OK):
        raise InputVolumeError(f"{path} is not readable (permission denied): check the file's permissions")
    if path.stat().st_size == 0:
        raise InputVolumeError(f"{path} is an empty file (0 bytes): the copy or download may have failed")
    if path.suffix.lower() == ".inv3":
        from .inv3 import read_inv3
        return read_inv3(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        known = any(path.name.lower().endswith(s) for s in FILE_SUFFIXES)
        why = ("the file is damaged or truncated" if known else
               f"its format is not recognised (supported: {SUPPORTED_TEXT})")
        raise InputVolumeError(f"cannot read {path} as an image: {why} ({_sitk_message(exc)})") from exc


def _size_text(image: sitk.Image) -> str:
    return "×".join(str(s) for s in image.GetSize())


def _intensity_warnings(lo: float, hi: float, dtype: np.dtype) -> list[str]:
    """Warnings when a CT model gets values that do not look like Hounsfield units."""
    advice = ("The CT model expects Hounsfield units (air ≈ -1000, water 0, bone > 300), so results will likely "
              "be poor. Check that this is a CT scan stored in HU, or use a model trained for this modality")
    if lo >= 0 and hi <= 255:
        return [f"intensities span {lo:g}..{hi:g} ({dtype}): this looks like an 8-bit image (a screenshot, "
                f"an exported PNG/JPEG or display values), not Hounsfield units. {advice}"]
    if lo >= 0 and hi <= 4095:
        return [f"intensities span {lo:g}..{hi:g}, none negative: this looks like MR intensities or raw CT "
                f"stored values without the DICOM rescale intercept (usually -1024) applied. {advice}"]
    if lo > -500:
        return [f"no voxel is below -500 (lowest {lo:g}): a CT scan normally contains air at about -1000 HU "
                f"around the body. {advice}"]
    return []


def check_image(image: sitk.Image, modality: str = "CT") -> list[str]:
    """Check a volume can be segmented by a model trained on ``modality``; return warnings.

    Raises InputVolumeError for 2D images, 4D+ images, vector/RGB images, complex values, NaN or infinite
    voxels, a constant (empty) volume, and an image with fewer than two axes longer than one voxel.
    A single slice (one axis of length 1) passes here; :func:`hsam.data.orientation.reorientation_for`
    checks that its plane is the model's slice plane. Warnings (not errors): intensities that do not look
    like CT Hounsfield units for a CT model, a DICOM modality other than ``modality``, and notes left by
    :func:`read_image`.
    """
    dim = image.GetDimension()
    if dim == 2:
        raise InputVolumeError(f"the image is 2D ({_size_text(image)} pixels); H-SAM segments 3D volumes slice "
                               "by slice: give the whole volume (a NIfTI/NRRD file or the DICOM series folder)")
    if dim != 3:
        raise InputVolumeError(f"the image is {dim}D (size {_size_text(image)}), e.g. a time series or several "
                               "volumes in one file; H-SAM segments one 3D volume: extract one 3D frame first "
                               "(Slicer: Sequences module; SimpleITK: image[:, :, :, t])")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputVolumeError(f"the image has {components} values per voxel (a vector, RGB or colour image); "
                               "H-SAM needs a single-channel grayscale volume such as a CT in HU: give the "
                               "original scan, not a coloured rendering or a multi-channel file")
    size = image.GetSize()
    if sum(1 for s in size if s == 1) >= 2:
        raise InputVolumeError(f"the image has size {_size_text(image)} (i×j×k): only one axis has more than one "
                               "voxel, so it is a line, not a volume or slice; give a 3D volume")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "c":
        raise InputVolumeError("the image holds complex values (e.g. raw MR k-space or phase data); "
                               "give a magnitude/real-valued volume")
    if array.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(array)))
        n_inf = int(np.count_nonzero(np.isinf(array)))
        if n_nan or n_inf:
            raise InputVolumeError(f"the image has {n_nan} NaN and {n_inf} infinite voxels (of {array.size}); "
                                   "the network cannot process them: fix the file (e.g. replace them with the "
                                   "background value) or re-export the volume")
    lo, hi = array.min().item(), array.max().item()
    if lo == hi:
        raise InputVolumeError(f"all {array.size} voxels have the same value {lo:g}: the volume is empty or "
                               "blank, so there is nothing to segment; check that the right file was given")

    warnings: list[str] = []
    if modality.upper() == "CT":
        warnings += _intensity_warnings(float(lo), float(hi), array.dtype)
    if image.HasMetaDataKey(MODALITY_TAG):
        found = image.GetMetaData(MODALITY_TAG).strip().upper()
        if found and found != modality.upper():
            warnings.append(f"the DICOM series is {found}, but the model was trained on {modality.upper()} "
                            "images: results may be poor")
    if image.HasMetaDataKey(READ_WARNINGS_KEY):
        warnings += [w for w in image.GetMetaData(READ_WARNINGS_KEY).split("\n") if w]
    return warnings
