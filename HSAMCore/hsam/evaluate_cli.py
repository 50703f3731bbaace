"""``hsam evaluate``: Dice and HD95 of predictions against ground truth, published and correct side by side.

    hsam evaluate PRED GT [--labels TABLE] [--classes 1,2,...] [--json FILE]
    hsam evaluate --synapse DATA_DIR PRED_DIR [--raw-dir DIR | --spacing X,Y,Z] [--json FILE]

PRED and GT are label maps or Slicer ``.seg.nrrd`` files on the same voxel grid, or two folders of files with
matching names (one row per case, then means). ``--synapse`` evaluates the 12 published Synapse test cases:
ground truth from ``DATA_DIR`` in the TransUNet layout (``caseXXXX.npy.h5``, dataset ``label``; needs h5py),
predictions ``caseXXXX[_pred].nii.gz`` (or .nrrd, .seg.nrrd) in PRED_DIR, classes = the 8 Synapse organs.

Every class gets two pairs of numbers (:mod:`hsam.metrics`): *published* = Dice and HD95 in voxels with the
H-SAM/TransUNet edge rules (what the papers' tables report); *correct* = Dice and HD95 in mm from the voxel
spacing, with undefined values left undefined (``n/a`` in the table, ``null`` in JSON) and out of the means.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import HSAMError, InputVolumeError

# The published Synapse test split (TransUNet / SAMed / H-SAM lists/lists_Synapse/test_vol.txt).
SYNAPSE_TEST_CASES = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
LABEL_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_NAME_TAGS = ("_prediction", "_pred", "_seg", "_labels", "_label", "_gt")

PUBLISHED_TEXT = ("Dice and HD95 in voxel units (spacing ignored) as medpy computes them, with the H-SAM/TransUNet "
                  "edge rules: prediction non-empty & ground truth empty -> Dice 1, HD95 0; prediction empty -> 0, 0")
CORRECT_TEXT = ("Dice and HD95 in mm (voxel spacing used); one side empty -> Dice 0, HD95 undefined; both empty -> "
                "class absent (Dice and HD95 undefined); undefined values (null) are left out of the means")


def add_evaluate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="Dice and HD95 of predictions against ground truth (published and mm conventions)",
        description="Per-class Dice and HD95 of PRED against GT: label maps or .seg.nrrd files on the same voxel "
                    "grid, or folders of files with matching names. Reports the published convention (HD95 in "
                    "voxels, the H-SAM/TransUNet edge rules) beside the correct one (HD95 in mm, undefined values "
                    "left undefined), as a table and optionally JSON. --synapse DATA_DIR PRED_DIR evaluates the 12 "
                    "published Synapse test cases.")
    parser.add_argument("pred", metavar="PRED", help="prediction: a label map / .seg.nrrd, or a folder of them "
                                                     "(with --synapse: the folder of caseXXXX predictions)")
    parser.add_argument("gt", metavar="GT", nargs="?", help="ground truth: a file or folder like PRED")
    parser.add_argument("--synapse", metavar="DATA_DIR",
                        help="evaluate the 12 Synapse test cases: DATA_DIR holds caseXXXX.npy.h5 (TransUNet's "
                             "test_vol_h5; needs h5py), PRED names the prediction folder")
    parser.add_argument("--labels", dest="label_table", metavar="TABLE",
                        help="label table naming the classes (JSON, CSV value,name[,r,g,b] or a Slicer .ctbl); "
                             "segments of .seg.nrrd files are matched to it by name")
    parser.add_argument("--classes", metavar="LIST", help="label values to evaluate, e.g. 1,2,3 (default: those "
                                                          "of --labels, the Synapse organs with --synapse, else "
                                                          "every value present in PRED or GT)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': stdout, the "
                                                       "table then goes to stderr)")
    parser.add_argument("--raw-dir", metavar="DIR",
                        help="with --synapse: the original BTCV images (imgXXXX.nii.gz) whose headers give each "
                             "case's voxel spacing for HD95 in mm")
    parser.add_argument("--spacing", metavar="X,Y,Z",
                        help="voxel spacing in mm along i,j,k (x,y,z) for HD95 in mm, overriding the files' "
                             "(with --synapse, whose .h5 files carry no spacing, used for every case)")
    parser.set_defaults(func=run_evaluate)


# ------------------------------------------------------------------------------------------------ cases

@dataclass
class CaseResult:
    """One evaluated case: per-class metrics in both conventions, voxel counts and the spacing used."""

    case: str
    pred: str
    gt: str
    spacing: tuple[float, ...] | None  # mm along i, j, k (x, y, z); None: unknown
    published: dict = field(default_factory=dict)  # value -> CaseMetric (HD95 voxels)
    correct: dict = field(default_factory=dict)  # value -> CaseMetric (HD95 mm)
    pred_voxels: dict = field(default_factory=dict)
    gt_voxels: dict = field(default_factory=dict)
    note: str = ""


def _parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    values = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise HSAMError(f"--classes {text!r}: give label values like 1,2,3 or 1-8") from None
        values.extend(span)
    if not values or any(not 1 <= v <= 255 for v in values):
        raise HSAMError(f"--classes {text!r}: label values must lie in 1..255 (0 is background)")
    return sorted(set(values))


def _parse_spacing(text: str | None) -> tuple[float, float, float] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise HSAMError(f"--spacing {text!r}: give three positive voxel sizes in mm along x,y,z, e.g. 0.7,0.7,3")
    return values


def _header(path: Path):
    """An object with GetSize/GetSpacing/GetOrigin/GetDirection for ``path``, reading no pixels if possible."""
    import SimpleITK as sitk

    from .data.volume import read_image

    if not path.exists():
        raise InputVolumeError(f"{path} does not exist: check the path")
    if path.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            return reader
        except RuntimeError:
            pass
    return read_image(path)  # raises a clear error (or reads what only it can read)


def _spacing_of(header) -> tuple[float, ...]:
    return tuple(float(s) for s in header.GetSpacing())


def _array_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    """Spacing along i, j, k → per array axis (k, j, i)."""
    if spacing is None:
        return None
    if len(spacing) != ndim:
        raise InputVolumeError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {ndim}D label map")
    return tuple(reversed(tuple(spacing)))


_CHUNK = 1 << 22


def _histogram(labels: np.ndarray) -> dict[int, int]:
    """Voxel count of every non-zero label value (chunked: no full-size temporary arrays)."""
    flat = labels.reshape(-1)
    if labels.dtype == np.uint8:
        counts = np.zeros(256, dtype=np.int64)
        for start in range(0, flat.size, _CHUNK):
            counts += np.bincount(flat[start:start + _CHUNK], minlength=256)
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v}
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts) if v > 0}


def evaluate_arrays(case: str, pred: np.ndarray, gt: np.ndarray, classes: Sequence[int] | None,
                    spacing: Sequence[float] | None, pred_name: str = "", gt_name: str = "") -> CaseResult:
    """Evaluate one case given label arrays ``(k, j, i)`` and ``spacing`` along (i, j, k) in mm (None: unknown,
    HD95 in mm then undefined). ``classes`` None: every value present in either array."""
    from .metrics import correct_case_metrics, published_case_metrics

    if pred.shape != gt.shape:
        raise InputVolumeError(f"{case}: the prediction has {pred.shape} voxels (k, j, i) but the ground truth "
                               f"{gt.shape}: they must be on the same grid")
    pred_hist, gt_hist = _histogram(pred), _histogram(gt)
    values = sorted(set(pred_hist) | set(gt_hist)) if classes is None else list(classes)
    result = CaseResult(case=case, pred=pred_name, gt=gt_name, spacing=tuple(spacing) if spacing else None)
    result.published = published_case_metrics(pred, gt, values)
    if spacing is not None:
        result.correct = correct_case_metrics(pred, gt, values, _array_spacing(spacing, pred.ndim))
    else:
        mm = correct_case_metrics(pred, gt, values, None)
        result.correct = {c: m._replace(hd95=math.nan) for c, m in mm.items()}
        result.note = "voxel spacing unknown: HD95 in mm not computed"
    result.pred_voxels = {c: pred_hist.get(c, 0) for c in values}
    result.gt_voxels = {c: gt_hist.get(c, 0) for c in values}
    return result


def read_case_pair(pred_path: Path, gt_path: Path, labelset=None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read a prediction and a ground truth label map (or ``.seg.nrrd``) that must share a voxel grid.

    Returns ``(pred, gt, spacing)``: uint8 arrays ``(k, j, i)`` and the ground truth's spacing along (i, j, k).
    Raises InputVolumeError naming the difference when the grids differ.
    """
    from .data.segfile import grid_difference, read_labels

    gt_header = _header(gt_path)
    pred_header = _header(pred_path)
    difference = grid_difference(pred_header, gt_header)
    if difference:
        raise InputVolumeError(
            f"the prediction {pred_path} and the ground truth {gt_path} are not on the same voxel grid "
            f"(prediction vs ground truth: {difference}). Metrics compare voxel by voxel: resample the prediction "
            "onto the ground truth's grid with nearest-neighbour interpolation (or segment the ground truth's own "
            "image)")
    gt = read_labels(gt_path, gt_header, labelset)
    pred = read_labels(pred_path, gt_header, labelset)
    return pred, gt, _spacing_of(gt_header)


# ------------------------------------------------------------------------------------------------ folders

def _case_key(path: Path) -> str | None:
    name = path.name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            for tag in _NAME_TAGS:
                if stem.lower().endswith(tag) and len(stem) > len(tag):
                    return stem[: -len(tag)]
            return stem
    return None


def _label_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        key = _case_key(path)
        if key is None:
            continue
        if key in files:
            raise InputVolumeError(f"{folder} holds two files for case {key!r}: {files[key].name} and {path.name}; "
                                   "keep one")
        files[key] = path
    return files


def _pair_folders(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[dict], list[str]]:
    gts, preds = _label_files(gt_dir), _label_files(pred_dir)
    if not gts:
        raise InputVolumeError(f"no label maps ({', '.join(LABEL_SUFFIXES)}) in the ground-truth folder {gt_dir}")
    pairs = [(key, preds[key], gts[key]) for key in sorted(gts) if key in preds]
    missing = [{"case": key, "gt": str(gts[key]), "reason": f"no prediction in {pred_dir}"}
               for key in sorted(gts) if key not in preds]
    extra = sorted(set(preds) - set(gts))
    return pairs, missing, extra


# ------------------------------------------------------------------------------------------------ synapse

def synapse_case_name(number: int) -> str:
    return f"case{number:04d}"


def _synapse_gt_dir(data_dir: Path) -> Path:
    for candidate in (data_dir, data_dir / "test_vol_h5", data_dir / "Synapse" / "test_vol_h5"):
        if candidate.is_dir() and any(candidate.glob("case*.npy.h5")):
            return candidate
    if not data_dir.is_dir():
        raise InputVolumeError(f"the Synapse data folder {data_dir} does not exist")
    raise InputVolumeError(f"no Synapse test volumes (caseXXXX.npy.h5) in {data_dir} or its test_vol_h5 subfolder: "
                           "give the folder of TransUNet's preprocessed test data (data/Synapse/test_vol_h5)")


def _require_h5py():
    try:
        import h5py
    except ImportError:
        raise HSAMError("reading the Synapse test volumes (caseXXXX.npy.h5) needs h5py, which is not installed: "
                        "run `pip install h5py`") from None
    return h5py


def read_synapse_label(path: Path) -> np.ndarray:
    """The ``label`` dataset of a TransUNet test volume ``caseXXXX.npy.h5``: uint8 ``(z, y, x)``."""
    h5py = _require_h5py()
    try:
        with h5py.File(str(path), "r") as handle:
            if "label" not in handle:
                raise InputVolumeError(f"{path} has no 'label' dataset (found {sorted(handle.keys())}): it is not "
                                       "a TransUNet Synapse test volume")
            label = np.asarray(handle["label"][:])
    except OSError as exc:
        raise InputVolumeError(f"cannot read {path}: {exc}") from exc
    if label.ndim != 3:
        raise InputVolumeError(f"{path}: the label is {label.ndim}D {label.shape}; a test volume is 3D (z, y, x)")
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        raise InputVolumeError(f"{path}: the label holds non-integer values")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise InputVolumeError(f"{path}: label values {label.min()}..{label.max()} lie outside 0..255")
    return label.astype(np.uint8)


def _synapse_prediction(pred_dir: Path, name: str) -> Path | None:
    for tag in ("", "_pred", "_prediction", "_seg"):
        for suffix in LABEL_SUFFIXES:
            path = pred_dir / f"{name}{tag}{suffix}"
            if path.is_file():
                return path
    return None


def _raw_spacing(raw_dir: Path, number: int, shape: tuple[int, ...]) -> tuple[float, ...]:
    for name in (f"img{number:04d}", synapse_case_name(number)):
        for suffix in (".nii.gz", ".nii", ".nrrd"):
            path = raw_dir / f"{name}{suffix}"
            if path.is_file():
                header = _header(path)
                if tuple(header.GetSize()) != tuple(reversed(shape)):
                    raise InputVolumeError(
                        f"{path} has {'×'.join(map(str, header.GetSize()))} voxels but the test volume "
                        f"{'×'.join(map(str, reversed(shape)))} (i×j×k): it is not this case's image")
                return _spacing_of(header)
    raise InputVolumeError(f"no original image img{number:04d}.nii.gz in {raw_dir} for the spacing of "
                           f"{synapse_case_name(number)}")


def evaluate_synapse(data_dir: Path, pred_dir: Path, classes: Sequence[int], raw_dir: Path | None = None,
                     spacing: Sequence[float] | None = None, log=None) -> tuple[list[CaseResult], list[dict]]:
    """Evaluate the 12 published Synapse test cases; returns (results, missing cases)."""
    gt_dir = _synapse_gt_dir(data_dir)
    if not pred_dir.is_dir():
        raise InputVolumeError(f"the prediction folder {pred_dir} does not exist")
    _require_h5py()
    results, missing = [], []
    for number in SYNAPSE_TEST_CASES:
        name = synapse_case_name(number)
        gt_path = gt_dir / f"{name}.npy.h5"
        pred_path = _synapse_prediction(pred_dir, name)
        if not gt_path.is_file():
            missing.append({"case": name, "gt": str(gt_path), "reason": f"no ground truth {gt_path.name} in {gt_dir}"})
            continue
        if pred_path is None:
            missing.append({"case": name, "gt": str(gt_path),
                            "reason": f"no prediction {name}.nii.gz (or _pred, .nrrd, .seg.nrrd) in {pred_dir}"})
            continue
        if log:
            log(f"evaluating {name}")
        gt = read_synapse_label(gt_path)
        from .data.segfile import read_labels

        pred_header = _header(pred_path)
        if tuple(pred_header.GetSize()) != tuple(reversed(gt.shape)):
            raise InputVolumeError(
                f"{name}: the prediction {pred_path} has {'×'.join(map(str, pred_header.GetSize()))} voxels (i×j×k) "
                f"but the test volume {'×'.join(map(str, reversed(gt.shape)))}: predictions must be on the test "
                "volume's grid (array (z, y, x) = the h5 label's)")
        pred = read_labels(pred_path, pred_header)
        case_spacing = tuple(spacing) if spacing else (
            _raw_spacing(raw_dir, number, gt.shape) if raw_dir else _spacing_of(pred_header))
        result = evaluate_arrays(name, pred, gt, classes, case_spacing, str(pred_path), str(gt_path))
        if not spacing and not raw_dir:
            result.note = ("spacing from the prediction's header" +
                           (" (1×1×1: may be a placeholder, as TransUNet writes; give --raw-dir)"
                            if np.allclose(case_spacing, 1.0) else ""))
        results.append(result)
    return results, missing


# ------------------------------------------------------------------------------------------------ output

def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _summary(results: Sequence[CaseResult], classes: Sequence[int]) -> dict:
    """Per-class and overall means in both conventions; a class missing from a case counts as absent there."""
    from .metrics import CaseMetric, aggregate

    published = [{c: r.published.get(c, CaseMetric(0.0, 0.0)) for c in classes} for r in results]
    correct = [{c: r.correct.get(c, CaseMetric(math.nan, math.nan)) for c in classes} for r in results]
    return {"published": aggregate(published, classes), "correct": aggregate(correct, classes)}


def _fill_absent(results: Sequence[CaseResult], classes: Sequence[int]) -> None:
    """Give every case every class: a class absent from both prediction and ground truth gets the rules' values."""
    from .metrics import CaseMetric

    for r in results:
        for c in classes:
            if c not in r.published:
                r.published[c] = CaseMetric(0.0, 0.0)
                r.correct[c] = CaseMetric(math.nan, math.nan)
                r.pred_voxels[c] = r.gt_voxels[c] = 0


def _case_means(metrics: dict, classes: Sequence[int]) -> tuple[float, float]:
    dices = [metrics[c].dice for c in classes if not math.isnan(metrics[c].dice)]
    hds = [metrics[c].hd95 for c in classes if not math.isnan(metrics[c].hd95)]
    return (float(np.mean(dices)) if dices else math.nan, float(np.mean(hds)) if hds else math.nan)


def results_json(mode: str, pred: str, gt: str, results: Sequence[CaseResult], missing: Sequence[dict],
                 classes: Sequence[int], names: dict[int, str]) -> dict:
    from . import __version__

    summary = _summary(results, classes)

    def class_summary(key: str, hd_key: str) -> dict:
        agg = summary[key]
        return {"per_class": {str(c): {"name": names[c], "dice": _nan_to_none(v["dice"]),
                                       hd_key: _nan_to_none(v["hd95"]), "n_cases": v["n_cases"],
                                       "n_dice": v["n_dice"], "n_hd95": v["n_hd95"]}
                              for c, v in agg["per_class"].items()},
                "mean": {"dice": _nan_to_none(agg["mean"]["dice"]), hd_key: _nan_to_none(agg["mean"]["hd95"])}}

    cases = []
    for r in results:
        cases.append({
            "case": r.case, "pred": r.pred, "gt": r.gt,
            "spacing_mm": list(r.spacing) if r.spacing else None, "note": r.note or None,
            "classes": {str(c): {"name": names[c],
                                 "published": {"dice": _nan_to_none(r.published[c].dice),
                                               "hd95_vox": _nan_to_none(r.published[c].hd95)},
                                 "dice": _nan_to_none(r.correct[c].dice), "hd95_mm": _nan_to_none(r.correct[c].hd95),
                                 "pred_voxels": r.pred_voxels[c], "gt_voxels": r.gt_voxels[c]}
                        for c in classes}})
    return {
        "tool": "hsam evaluate", "version": __version__, "mode": mode, "pred": pred, "gt": gt,
        "classes": [{"value": c, "name": names[c]} for c in classes],
        "conventions": {"published": PUBLISHED_TEXT, "correct": CORRECT_TEXT},
        "cases": cases, "missing": list(missing),
        "summary": {"published": class_summary("published", "hd95_vox"),
                    "correct": class_summary("correct", "hd95_mm")},
    }


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _with_count(text: str, n: int, total: int) -> str:
    return text if n == total else f"{text} ({n}/{total})"


def results_table(results: Sequence[CaseResult], missing: Sequence[dict], classes: Sequence[int],
                  names: dict[int, str]) -> str:
    """The human-readable report: per-class (means over cases) table, per-case means when several cases."""
    summary = _summary(results, classes)
    pub, cor = summary["published"], summary["correct"]
    width = max([len(f"{c} {names[c]}") for c in classes] + [len("mean over classes"), 8])
    lines = []
    several = len(results) > 1
    title = f"{len(results)} case{'s' if several else ''}" + (f" ({len(missing)} missing)" if missing else "")
    lines.append(f"{'':{width}}  {'published (voxels)':^19}  | {'correct (mm)':^30}   [{title}]")
    lines.append(f"{'class':{width}}  {'Dice':>8} {'HD95 vox':>10}  | {'Dice':>14} {'HD95 mm':>15}")
    for c in classes:
        p, q = pub["per_class"][c], cor["per_class"][c]
        lines.append(f"{f'{c} {names[c]}':{width}}  {_fmt(p['dice'], 4):>8} {_fmt(p['hd95'], 2):>10}  | "
                     f"{_with_count(_fmt(q['dice'], 4), q['n_dice'], q['n_cases']):>14} "
                     f"{_with_count(_fmt(q['hd95'], 2), q['n_hd95'], q['n_cases']):>15}")
    lines.append(f"{'mean over classes':{width}}  {_fmt(pub['mean']['dice'], 4):>8} "
                 f"{_fmt(pub['mean']['hd95'], 2):>10}  | "
                 f"{_fmt(cor['mean']['dice'], 4):>14} {_fmt(cor['mean']['hd95'], 2):>15}")
    if several:
        cw = max([len(r.case) for r in results] + [len(m["case"]) for m in missing] + [4])
        lines.append("")
        lines.append(f"{'case':{cw}}  {'Dice':>8} {'HD95 vox':>10}  | {'Dice':>14} {'HD95 mm':>15}"
                     "   (means over classes)")
        for r in results:
            pd, ph = _case_means(r.published, classes)
            cd, ch = _case_means(r.correct, classes)
            lines.append(f"{r.case:{cw}}  {_fmt(pd, 4):>8} {_fmt(ph, 2):>10}  | {_fmt(cd, 4):>14} {_fmt(ch, 2):>15}")
    for m in missing:
        lines.append(f"missing {m['case']}: {m['reason']}")
    notes = sorted({r.note for r in results if r.note})
    for note in notes:
        lines.append(f"note: {note}")
    lines.append("published: HD95 in voxels; prediction non-empty & GT empty -> (1, 0), prediction empty -> (0, 0).")
    lines.append("correct: HD95 in mm; (n/N) = cases where the value is defined (one side empty: HD95 undefined; "
                 "both empty: class absent).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command

def _labelset_and_classes(args) -> tuple[object, list[int] | None]:
    from .data.labels import SYNAPSE_ORGANS, LabelSet

    labelset = None
    if args.label_table:
        path = Path(args.label_table).expanduser()
        if not path.is_file():
            raise HSAMError(f"the label table {path} does not exist")
        try:
            labelset = LabelSet.from_table(path)
        except (ValueError, KeyError) as exc:
            raise HSAMError(f"cannot read the label table {path}: {exc}") from exc
    elif args.synapse:
        labelset = SYNAPSE_ORGANS
    classes = _parse_classes(args.classes)
    if labelset is not None:
        if classes is None:
            classes = list(labelset.values)
        unknown = sorted(set(classes) - set(labelset.values))
        if unknown:
            raise HSAMError(f"--classes {unknown} are not classes of the label set {labelset.name!r} "
                            f"({list(labelset.values)})")
    return labelset, classes


def run_evaluate(args) -> int:
    out = sys.stderr if args.json == "-" else sys.stdout

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    labelset, classes = _labelset_and_classes(args)
    spacing = _parse_spacing(args.spacing)
    pred_path = Path(args.pred).expanduser()
    missing: list[dict] = []
    if args.synapse:
        if args.gt:
            raise HSAMError("with --synapse give only the prediction folder: hsam evaluate --synapse DATA_DIR PRED_DIR")
        mode, gt_text = "synapse", args.synapse
        results, missing = evaluate_synapse(Path(args.synapse).expanduser(), pred_path, classes,
                                            Path(args.raw_dir).expanduser() if args.raw_dir else None, spacing, log)
        if not results:
            raise InputVolumeError("no Synapse test case could be evaluated: "
                                   + "; ".join(f"{m['case']}: {m['reason']}" for m in missing))
    else:
        if args.raw_dir:
            raise HSAMError("--raw-dir goes with --synapse")
        if not args.gt:
            raise HSAMError("give PRED and GT (files or folders), or --synapse DATA_DIR PRED_DIR")
        gt_path = Path(args.gt).expanduser()
        gt_text = str(gt_path)
        for path in (pred_path, gt_path):
            if not path.exists():
                raise InputVolumeError(f"{path} does not exist: check the path")
        if pred_path.is_dir() != gt_path.is_dir():
            raise HSAMError(f"PRED and GT must both be files or both be folders ({pred_path} is a "
                            f"{'folder' if pred_path.is_dir() else 'file'}, {gt_path} a "
                            f"{'folder' if gt_path.is_dir() else 'file'})")
        if pred_path.is_dir():
            mode = "folders"
            pairs, missing, extra = _pair_folders(pred_path, gt_path)
            if extra:
                log(f"warning: predictions without ground truth ignored: {', '.join(extra)}")
            if not pairs:
                raise InputVolumeError(f"no prediction in {pred_path} matches a ground truth file in {gt_path} by "
                                       "name (caseX.nii.gz ~ caseX.nii.gz, caseX_pred.nii.gz, caseX.seg.nrrd)")
        else:
            mode = "files"
            pairs = [(_case_key(gt_path) or gt_path.name, pred_path, gt_path)]
        results = []
        for key, pred_file, gt_file in pairs:
            if len(pairs) > 1:
                log(f"evaluating {key}")
            pred, gt, gt_spacing = read_case_pair(pred_file, gt_file, labelset)
            results.append(evaluate_arrays(key, pred, gt, classes, spacing or gt_spacing, str(pred_file),
                                           str(gt_file)))
    for m in missing:
        log(f"warning: {m['case']} not evaluated: {m['reason']}")
    if classes is None:
        classes = sorted(set().union(*(r.published.keys() for r in results)))
    _fill_absent(results, classes)
    names = {c: (labelset.by_value(c).name if labelset is not None else f"label {c}") for c in classes}
    if not classes:
        log("warning: neither the predictions nor the ground truth hold any label: nothing to evaluate")
    print(results_table(results, missing, classes, names), file=out)
    if args.json:
        payload = json.dumps(results_json(mode, str(pred_path), gt_text, results, missing, classes, names), indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).expanduser().write_text(payload + "\n", encoding="utf-8")
            print(f"wrote {args.json}", file=out)
    return 0
