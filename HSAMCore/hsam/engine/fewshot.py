"""The few-shot protocol on real MR data (Colin27 T1 + AAL grouped into 7 structures), shared by the benchmark
script (``Testing/benchmarks/fewshot_colin27.py``) and ``hsam demo``.

Protocol: the atlas labels of every n-th axial slice (k plane) are given, from the first labelled slice on
(n = 40, 20, 10, 5 ≈ 2.5, 5, 10, 20 % of the 146 labelled slices); the other slices of the labelled extent are
segmented and compared with the atlas (Dice per structure over those slices together; mean over structures).
Methods on the same given slices:

``hsam``          fast fine-tuning of the LiteMedSAM base (:func:`hsam.engine.finetune.finetune`), then the
                  prompt-free H-SAM on every other slice (the default whole-volume path);
``hsam-guided``   the same fine-tuned model, guided by the given slices around each segmented slice, their labels
                  propagated onto it by registration (:mod:`hsam.engine.guidance`, :mod:`hsam.engine.propagation`);
``propagation``   the guided mode's prior alone: arg-max of the labels of the given slices below and above,
                  registration-propagated, fused per pixel by distance and local image fit, blurred;
``guidance``      without registration: the given slices' labels blended ∝ 1/distance as they are;
``interpolation`` ITK morphological contour interpolation (Slicer's Fill between slices);
``nearest``       copy of the nearest given slice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.aal import AALGroups, colin27_paths, load_aal_groups

log = logging.getLogger("hsam")

EVERY_FOR_PERCENT = {2.5: 40, 5: 20, 10: 10, 20: 5}
METHODS = ("hsam", "hsam-guided", "propagation", "guidance", "interpolation", "nearest")


@dataclass
class FewShotCase:
    """The volume, its atlas grouped into structures (``(k, j, i)`` uint8 on the volume's grid), the labelled
    extent (k planes holding any structure)."""

    image: object
    atlas: np.ndarray
    groups: AALGroups
    extent: list[int]
    source: str = ""

    @property
    def labelset(self):
        return self.groups.labelset


def load_colin27(folder: str | Path | None = None) -> FewShotCase:
    """Colin27 T1 and the grouped AAL atlas (Debian mricron-data)."""
    import SimpleITK as sitk

    from ..data.aal import check_region_names
    from ..data.segfile import grid_difference

    t1, atlas_path, names = colin27_paths(folder)
    groups = load_aal_groups()
    check_region_names(groups, names)
    image = sitk.ReadImage(str(t1))
    atlas_image = sitk.ReadImage(str(atlas_path))
    difference = grid_difference(atlas_image, image)
    if difference:
        raise ValueError(f"{atlas_path} is not on the grid of {t1}: {difference}")
    atlas = groups.group(sitk.GetArrayFromImage(atlas_image))
    planes = np.flatnonzero(atlas.reshape(atlas.shape[0], -1).any(axis=1))
    return FewShotCase(image=image, atlas=atlas, groups=groups, extent=list(range(int(planes[0]), int(planes[-1]) + 1)),
                       source=str(t1))


def given_slices(extent: Sequence[int], every: int) -> list[int]:
    """Every ``every``-th plane of the extent, from its first one."""
    return list(range(extent[0], extent[-1] + 1, every))


def dice_table(pred: np.ndarray, truth: np.ndarray, planes: Sequence[int], labelset) -> dict[str, float]:
    """Dice per structure over the k ``planes`` together (NaN where a structure is absent from both)."""
    p = np.asarray(pred)[list(planes)]
    t = np.asarray(truth)[list(planes)]
    out = {}
    for c in labelset.classes:
        a, b = p == c.value, t == c.value
        total = int(a.sum()) + int(b.sum())
        out[c.name] = float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")
    return out


def mean_dice(table: dict[str, float]) -> float:
    values = [v for v in table.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@dataclass
class MethodResult:
    method: str
    dice: dict[str, float]
    seconds: float
    details: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return mean_dice(self.dice)


@dataclass
class LevelResult:
    """One sparsity level: every ``every``-th slice given."""

    every: int
    percent: float
    given: list[int]
    evaluated: list[int]
    methods: dict[str, MethodResult]
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def run_level(case: FewShotCase, every: int, methods: Sequence[str] = METHODS, *, base=None, settings=None,
              embeddings=None, dtype=None, keep_predictions: bool = False, progress: Callable | None = None,
              cancel=None, model_out: str | Path | None = None) -> LevelResult:
    """Run ``methods`` on one sparsity level. ``embeddings``: the cached embeddings of every extent plane
    (``(len(extent), C, g, g)``; computed when None). ``progress(done, total, stage)`` as fine-tuning reports it."""
    from .baselines import contour_interpolation, contour_interpolation_available, nearest_copy

    given = given_slices(case.extent, every)
    evaluated = [k for k in case.extent if k not in set(given)]
    percent = round(100.0 * len(given) / len(case.extent), 1)
    results: dict[str, MethodResult] = {}
    predictions: dict[str, np.ndarray] = {}
    if "nearest" in methods:
        t = time.perf_counter()
        pred = nearest_copy(case.atlas, given, evaluated)
        results["nearest"] = MethodResult("nearest", dice_table(pred, case.atlas, evaluated, case.labelset),
                                          time.perf_counter() - t)
        predictions["nearest"] = pred
    if "guidance" in methods:
        t = time.perf_counter()
        pred = guidance_only(case, given, evaluated)
        results["guidance"] = MethodResult("guidance", dice_table(pred, case.atlas, evaluated, case.labelset),
                                           time.perf_counter() - t)
        predictions["guidance"] = pred
    guides = None
    if "propagation" in methods or "hsam-guided" in methods:
        base = base or base_model(case.labelset)
        t = time.perf_counter()
        guides = propagated_guides(case, given, evaluated, base.description)
        propagation_seconds = time.perf_counter() - t
    if "propagation" in methods:
        t = time.perf_counter()
        pred = guides_argmax(case, evaluated, guides, base.description)
        results["propagation"] = MethodResult("propagation", dice_table(pred, case.atlas, evaluated, case.labelset),
                                              propagation_seconds + time.perf_counter() - t)
        predictions["propagation"] = pred
    if "interpolation" in methods:
        if contour_interpolation_available():
            t = time.perf_counter()
            pred = contour_interpolation(case.atlas, given)
            results["interpolation"] = MethodResult(
                "interpolation", dice_table(pred, case.atlas, evaluated, case.labelset), time.perf_counter() - t)
            predictions["interpolation"] = pred
        else:
            log.warning("contour interpolation skipped: pip install itk-morphologicalcontourinterpolation")
    if "hsam" in methods or "hsam-guided" in methods:
        ours = run_hsam(case, given, evaluated, base=base, settings=settings, embeddings=embeddings, dtype=dtype,
                        guided="hsam-guided" in methods, prompt_free="hsam" in methods, progress=progress,
                        cancel=cancel, model_out=model_out, guides=guides)
        if "hsam-guided" in ours:  # its time includes the propagation it shares with "propagation"
            ours["hsam-guided"][1].seconds += propagation_seconds
        for key, (pred, result) in ours.items():
            results[key] = result
            predictions[key] = pred
    return LevelResult(every=every, percent=percent, given=given, evaluated=evaluated, methods=results,
                       predictions=predictions if keep_predictions else {})


def guidance_only(case: FewShotCase, given: list[int], evaluated: list[int]) -> np.ndarray:
    """Arg-max of the plain blended guidance (:func:`hsam.engine.guidance.neighbour_guidance`) on the k planes
    ``evaluated``."""
    import torch

    from .guidance import neighbour_guidance

    values = np.asarray(case.labelset.index_to_value_lut(), dtype=np.uint8)
    to_index = np.zeros(256, dtype=np.uint8)
    to_index[values] = np.arange(len(values), dtype=np.uint8)
    labels = {k: to_index[case.atlas[k]] for k in given}
    out = np.zeros_like(case.atlas)
    with torch.inference_mode():
        for k in evaluated:
            out[k] = values[neighbour_guidance(labels, k, case.labelset.num_classes).argmax(0).numpy()]
    return out


def propagated_guides(case: FewShotCase, given: list[int], evaluated: list[int], description):
    """The registration-propagated guidance (n, K, H, W) of the k planes ``evaluated``, in the model's orientation
    (as the guided mode computes it; shared by "propagation" and "hsam-guided")."""
    import torch

    from ..data.orientation import reorientation_for
    from .guidance import guidance_for

    desc = description
    reorient = reorientation_for(case.image, desc.orientation)
    values = np.asarray(case.labelset.index_to_value_lut(), dtype=np.uint8)
    to_index = np.zeros(256, dtype=np.uint8)
    to_index[values] = np.arange(len(values), dtype=np.uint8)
    atlas_model = reorient.to_model(to_index[case.atlas])
    labels = {k: atlas_model[reorient.model_slice_index(k)] for k in given}
    with torch.inference_mode():
        return guidance_for(labels, evaluated, case.labelset.num_classes, extent_images(case, desc))


def guides_argmax(case: FewShotCase, evaluated: list[int], guides, description) -> np.ndarray:
    """Label volume (k, j, i) holding the arg-max of ``guides`` (model orientation) on the planes ``evaluated``."""
    from ..data.orientation import reorientation_for

    reorient = reorientation_for(case.image, description.orientation)
    values = np.asarray(case.labelset.index_to_value_lut(), dtype=np.uint8)
    stack = np.zeros(reorient.model_shape, dtype=np.uint8)
    for k, guide in zip(evaluated, guides):
        stack[reorient.model_slice_index(k)] = guide.argmax(0).numpy()
    return values[reorient.to_input(stack)]


def extent_images(case: FewShotCase, description) -> dict[int, np.ndarray]:
    """{k: (H, W) normalised slice in the model's orientation} of every plane of the labelled extent (what
    registration-propagated guidance registers)."""
    from .finetune_data import slice_inputs

    images = slice_inputs(case.image, description, case.extent)[0]
    return dict(zip(case.extent, images))


def base_model(labelset):
    """The LiteMedSAM base for ``labelset`` (offline)."""
    from ..weights.litemedsam import build_litemedsam_base
    from ..weights.loader import LoadedModel

    model, description, report = build_litemedsam_base(labelset)
    return LoadedModel(model.eval(), description, "litemedsam-base", report.summary())


def extent_embeddings(case: FewShotCase, base, dtype=None, progress=None, cancel=None):
    """Embeddings of every plane of the labelled extent (cached on disk per volume/model/preprocessing)."""
    from .finetune import embed_slices

    return embed_slices(base.model, case.image, base.description, case.extent, dtype=dtype, progress=progress,
                        cancel=cancel)


def run_hsam(case: FewShotCase, given: list[int], evaluated: list[int], *, base=None, settings=None, embeddings=None,
             dtype=None, guided: bool = True, prompt_free: bool = True, progress=None, cancel=None,
             model_out: str | Path | None = None, guides=None) -> dict:
    """Fine-tune on ``given`` and segment ``evaluated``; returns {method: (prediction (k, j, i), MethodResult)}."""
    import torch

    from ..data.orientation import reorientation_for
    from .finetune import FinetuneSettings, autocast_dtype, decode_embeddings, finetune
    from .guidance import guided_decode

    base = base or base_model(case.labelset)
    settings = settings or FinetuneSettings()
    if dtype is None:
        dtype = autocast_dtype(torch.device("cpu"), settings.precision)
    t_embed = time.perf_counter()
    if embeddings is None:
        embeddings = extent_embeddings(case, base, dtype, progress=(lambda d, t: progress(d, t, "embed"))
                                       if progress else None, cancel=cancel)
    t_embed = time.perf_counter() - t_embed
    t = time.perf_counter()
    result = finetune(case.image, case.atlas, given, base, mode="fast", labelset=case.labelset, settings=settings,
                      progress=progress, cancel=cancel, save=model_out is not None, out=model_out,
                      image_name=Path(case.source).name)
    t_train = time.perf_counter() - t
    reorient = reorientation_for(case.image, result.description.orientation)
    positions = [case.extent.index(k) for k in evaluated]
    slice_size = reorient.model_shape[1:]
    lut = np.asarray(case.labelset.index_to_value_lut(), dtype=np.uint8)

    def to_volume(indices: np.ndarray) -> np.ndarray:
        stack = np.zeros(reorient.model_shape, dtype=np.uint8)
        for k, sl in zip(evaluated, indices):
            stack[reorient.model_slice_index(k)] = sl
        return lut[reorient.to_input(stack)]

    out = {}
    common = {"train_seconds": round(t_train, 1), "embed_seconds": round(t_embed, 1),
              "validation": result.validation, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
              "stopped_early": result.stopped_early, "finetune_timings": result.timings,
              "train_slices": result.train_slices, "validation_slices": result.validation_slices,
              "model_path": str(result.path) if result.path else None}
    if prompt_free:
        t = time.perf_counter()
        indices = decode_embeddings(result.loaded.model, embeddings[positions], slice_size, dtype=dtype, cancel=cancel,
                                    progress=(lambda d, n: progress(d, n, "segment")) if progress else None)
        pred = to_volume(indices)
        seconds = time.perf_counter() - t
        out["hsam"] = (pred, MethodResult("hsam", dice_table(pred, case.atlas, evaluated, case.labelset),
                                          t_train + seconds, {**common, "decode_seconds": round(seconds, 1)}))
    if guided:
        t = time.perf_counter()
        to_index = np.zeros(256, dtype=np.uint8)
        to_index[lut] = np.arange(len(lut), dtype=np.uint8)
        atlas_model = reorient.to_model(to_index[case.atlas])
        corrected = {k: atlas_model[reorient.model_slice_index(k)] for k in given}
        indices, info = guided_decode(result.loaded, corrected, evaluated, embeddings[positions], dtype=dtype,
                                      cancel=cancel, guides=guides,
                                      images=None if guides is not None else extent_images(case, result.description),
                                      progress=(lambda d, n: progress(d, n, "segment guided")) if progress else None)
        pred = to_volume(indices)
        seconds = time.perf_counter() - t
        out["hsam-guided"] = (pred, MethodResult("hsam-guided", dice_table(pred, case.atlas, evaluated,
                                                                           case.labelset),
                                                 t_train + seconds, {**common, "decode_seconds": round(seconds, 1),
                                                                     **info}))
    return out


# ---------------------------------------------------------------------------------------------- reports

METHOD_TITLES = {"hsam": "H-SAM fast fine-tune (prompt-free)", "hsam-guided": "H-SAM fast fine-tune + guidance",
                 "propagation": "propagation alone (registered neighbour slices)",
                 "guidance": "guidance alone (blended neighbour slices)",
                 "interpolation": "contour interpolation (ITK, Fill between slices)", "nearest": "nearest given slice"}


def markdown_table(levels: Sequence[LevelResult], labelset) -> str:
    """Mean Dice per method and level, then per-structure Dice per level."""
    methods = [m for m in METHODS if any(m in lv.methods for lv in levels)]
    lines = ["| method | " + " | ".join(f"{lv.percent:g} % ({len(lv.given)} slices)" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for m in methods:
        cells = [f"{lv.methods[m].mean:.3f}" if m in lv.methods else "–" for lv in levels]
        lines.append(f"| {METHOD_TITLES[m]} | " + " | ".join(cells) + " |")
    for lv in levels:
        lines += ["", f"Every {lv.every}th slice given ({len(lv.given)} of {len(lv.given) + len(lv.evaluated)}, "
                      f"{lv.percent:g} %), Dice on the other {len(lv.evaluated)}:", "",
                  "| structure | " + " | ".join(m for m in methods if m in lv.methods) + " |",
                  "|---|" + "---|" * sum(1 for m in methods if m in lv.methods)]
        for c in labelset.classes:
            lines.append(f"| {c.name} | " + " | ".join(f"{lv.methods[m].dice[c.name]:.3f}"
                                                       for m in methods if m in lv.methods) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{lv.methods[m].mean:.3f}**" for m in methods
                                                  if m in lv.methods) + " |")
        lines.append("| seconds | " + " | ".join(f"{lv.methods[m].seconds:.0f}" for m in methods
                                                if m in lv.methods) + " |")
    return "\n".join(lines) + "\n"


def results_json(levels: Sequence[LevelResult], extra: dict | None = None) -> dict:
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        return v
    return clean({**(extra or {}), "levels": [
        {"every": lv.every, "percent": lv.percent, "given": lv.given, "evaluated_count": len(lv.evaluated),
         "methods": {m: {"mean_dice": r.mean, "dice": r.dice, "seconds": round(r.seconds, 2), "details": r.details}
                     for m, r in lv.methods.items()}} for lv in levels]})


def write_plot(levels: Sequence[LevelResult], path: str | Path, title: str = "") -> Path | None:
    """Mean Dice vs percentage of given slices, one line per method (matplotlib; None if it is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plot skipped: matplotlib is not installed")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for m in METHODS:
        points = [(lv.percent, lv.methods[m].mean) for lv in levels if m in lv.methods]
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=METHOD_TITLES[m])
    ax.set_xlabel("given slices (% of the labelled extent)")
    ax.set_ylabel("mean Dice over 7 structures (other slices)")
    ax.set_xscale("log", base=2)
    ticks = sorted({lv.percent for lv in levels})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Colin27 T1, AAL grouped into 7 structures", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path
