"""Fine-tuning from the slices the user corrected: which slices, their labels, and the background run.

    labels, label_set = training_labels(segmentation_node, volume_node)      # (k, j, i) uint8 on the volume's grid
    slices = proposed_slices(labels, label_set, predictions.get(segmentation_node))
    job = FinetuneJob(scene, FinetuneRequest(volume_node, segmentation_node, slices, base_model), launcher).start()

Slices are numbered along the volume's third voxel axis (K, as Slicer's Data Probe shows it), the numbering
``hsam finetune --slices`` uses. "Corrected" means: the slice's labels differ from the last prediction this session
made into that segmentation (:class:`PredictionStore`); without one (a segmentation drawn from scratch, or a
reloaded scene) every slice holding a label is proposed. The user can edit the list.

The run exports the volume and the segmentation's labels into a private temporary folder, starts
``python -m hsam.worker finetune`` and, on success, names the new model file in the per-user models folder (the
core writes it there, with a readable name and date); the base model and the scene are never modified.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsam import worker_protocol as protocol
from hsam.data.labels import LabelClass, LabelSet, Terminology, default_color
from hsam.errors import HSAMError

from . import scene_io
from .errors import SegmentInputError
from .models import ModelChoice
from .run import DEVICES, JobState, ProgressInfo, WorkerJob

MODES = ("fast", "full")
LABEL_VALUE_TAG = scene_io.ATTRIBUTE_PREFIX + "LabelValue"
_VALIDATION = re.compile(r"epoch (\d+)/(\d+):.*validation Dice ([0-9.]+)")


class FinetuneInputError(SegmentInputError):
    """The fine-tuning inputs cannot be used (checked before anything runs)."""


# ---------------------------------------------------------------------------------------------- slices

def format_slice_list(slices: list[int]) -> str:
    """``[3, 7, 8, 9, 20]`` → ``"3, 7-9, 20"``."""
    out: list[str] = []
    ordered = sorted(set(int(s) for s in slices))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(out)


def parse_slice_list(text: str, depth: int) -> list[int]:
    """The slice list the user typed (``"3, 7-9, 20"``), checked against the volume's ``depth`` (K slices)."""
    from hsam.engine.finetune_data import parse_slice_spec

    if not str(text).strip():
        raise FinetuneInputError("No corrected slice is listed: correct a few slices of the segmentation, then "
                                 "click 'Propose' (or type their numbers, e.g. 12, 40-45).")
    try:
        slices = parse_slice_spec(str(text))
    except HSAMError as exc:
        raise FinetuneInputError(str(exc)) from exc
    outside = [k for k in slices if not 0 <= k < depth]
    if outside:
        raise FinetuneInputError(f"Slices {format_slice_list(outside)} lie outside the volume: it has {depth} slices "
                                 f"along K, numbered 0-{depth - 1}")
    return slices


# ---------------------------------------------------------------------------------------------- labels

@dataclass
class Prediction:
    """What the model predicted into a segmentation node (this session)."""

    node: Any
    labels: np.ndarray  # (k, j, i) uint8 on the input volume's grid
    label_set: LabelSet
    model_id: str = ""


class PredictionStore:
    """The last prediction per segmentation node, for the most recent few nodes (memory: one byte per voxel each)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._items: dict[str, Prediction] = {}

    def remember(self, node: Any, labels: np.ndarray, label_set: LabelSet, model_id: str = "") -> None:
        self._items.pop(node.GetID(), None)
        self._items[node.GetID()] = Prediction(node, np.array(labels, dtype=np.uint8, copy=True), label_set, model_id)
        while len(self._items) > self.keep:
            self._items.pop(next(iter(self._items)))

    def get(self, node: Any) -> Prediction | None:
        if node is None:
            return None
        item = self._items.get(node.GetID())
        return item if item is not None and item.node is node else None

    def clear(self) -> None:
        self._items.clear()

    def listener(self, forward=None):
        """A job listener that remembers a successful segment job's prediction, then calls ``forward``."""

        def on_event(job, what: str) -> None:
            if (what == "state" and job.state is JobState.SUCCEEDED and getattr(job, "labels", None) is not None
                    and job.result_node is not None):
                self.remember(job.result_node, job.labels, job.label_set, job.request.model.id)
            if forward is not None:
                forward(job, what)

        return on_event


def _segments(segmentation_node: Any) -> list[tuple[str, Any]]:
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i))
            for i in range(segmentation.GetNumberOfSegments())]


def _tag(segment: Any, name: str) -> str:
    """A segment's tag value ("" if it has none); VTK's Python wrapping returns it through a mutable string."""
    if not segment.HasTag(name):
        return ""
    value = scene_io._vtk().mutable("")
    segment.GetTag(name, value)
    return str(value)


def _label_values(segments: list[tuple[str, Any]]) -> list[int]:
    """The label value of each segment: the values a prediction gave them (tag ``HSAM.LabelValue``) when every
    segment has a distinct one, else 1..N in segment order."""
    values = []
    for _segment_id, segment in segments:
        text = _tag(segment, LABEL_VALUE_TAG)
        values.append(int(text) if text.isdigit() else -1)
    if all(1 <= v <= 255 for v in values) and len(set(values)) == len(values):
        return values
    return list(range(1, len(segments) + 1))


def _terminology(segment: Any) -> Terminology | None:
    tag = _tag(segment, segment.GetTerminologyEntryTagName())
    if not tag:
        return None
    try:
        return Terminology.from_slicer_tag(tag)
    except (ValueError, IndexError):
        return None


def _merged_labels_on_volume_grid(segmentation_node: Any, volume_node: Any, ids: Any) -> np.ndarray:
    """The segments ``ids`` merged (value n+1 = the n-th ID) and resampled (nearest) onto the volume's voxel grid,
    (k, j, i). Works on nodes outside the scene too (unlike exporting to a label map node), and adds nothing to it."""
    slicer = scene_io._slicer()
    from vtk.util import numpy_support

    merged = slicer.vtkOrientedImageData()
    with scene_io._quiet_vtk():
        ok = segmentation_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, None, ids)
        reference = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume_node)
        resampled = slicer.vtkOrientedImageData()
        ok = ok and slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            merged, reference, resampled, False, True)
    dims = volume_node.GetImageData().GetDimensions()
    if not ok or resampled.GetPointData().GetScalars() is None or tuple(resampled.GetDimensions()) != tuple(dims):
        raise FinetuneInputError(f"the segments of '{segmentation_node.GetName()}' could not be brought onto the voxel "
                                 f"grid of '{volume_node.GetName()}'")
    array = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    return np.array(array).reshape(dims[2], dims[1], dims[0])


def training_labels(segmentation_node: Any, volume_node: Any, name: str = "") -> tuple[np.ndarray, LabelSet]:
    """The segmentation as a label map on the volume's voxel grid, (k, j, i) uint8, and its label set (segment
    names, colours, terminology). Neither node is modified."""
    vtk = scene_io._vtk()
    segments = _segments(segmentation_node)
    if not segments:
        raise FinetuneInputError(f"the segmentation '{segmentation_node.GetName()}' has no segments: segment the "
                                 "volume first, or draw the structures on a few slices in Segment Editor")
    if len(segments) > 255:
        raise FinetuneInputError(f"the segmentation has {len(segments)} segments; at most 255 can be learned")
    values = _label_values(segments)
    order = sorted(range(len(segments)), key=lambda n: values[n])
    ids = vtk.vtkStringArray()
    for n in order:
        ids.InsertNextValue(segments[n][0])
    exported = _merged_labels_on_volume_grid(segmentation_node, volume_node, ids)
    lookup = np.zeros(256, np.uint8)  # exported value p+1 = position p in ``order`` → the segment's label value
    for position, n in enumerate(order):
        lookup[position + 1] = values[n]
    labels = lookup[np.clip(exported, 0, 255).astype(np.intp)]
    classes = []
    for n, (_segment_id, segment) in enumerate(segments):
        rgb = tuple(int(round(c * 255)) for c in segment.GetColor())
        classes.append(LabelClass(value=values[n], name=segment.GetName() or f"label {values[n]}",
                                  color=rgb if len(rgb) == 3 else default_color(values[n]),
                                  terminology=_terminology(segment)))
    classes.sort(key=lambda c: c.value)
    return labels, LabelSet(name=name or segmentation_node.GetName() or "labels", classes=tuple(classes))


def proposed_slices(labels: np.ndarray, label_set: LabelSet, prediction: Prediction | None) -> tuple[list[int], str]:
    """(slices, why): the K slices whose labels differ from ``prediction`` (classes matched by name), or, without
    a usable prediction, every slice that holds a label."""
    depth = labels.shape[0]
    if prediction is not None and prediction.labels.shape == labels.shape:
        by_name = {c.name: c.value for c in label_set.classes}
        mapping = np.zeros(256, np.int16)
        for cls in prediction.label_set.classes:
            mapping[cls.value] = by_name.get(cls.name, -1)  # a deleted class: its voxels count as changed
        predicted = mapping[prediction.labels]
        changed = (predicted != labels).reshape(depth, -1).any(axis=1)
        slices = [int(k) for k in np.flatnonzero(changed)]
        return slices, (f"{len(slices)} slice(s) differ from the last prediction" if slices else
                        "no slice differs from the last prediction: correct some slices in Segment Editor first")
    labelled = labels.reshape(depth, -1).any(axis=1)
    slices = [int(k) for k in np.flatnonzero(labelled)]
    return slices, (f"{len(slices)} slice(s) hold labels (no prediction of this session to compare with: remove "
                    "slices you did not check)" if slices else "no slice holds a label yet")


def propose_corrected_slices(volume_node: Any, segmentation_node: Any, predictions: PredictionStore
                             ) -> tuple[list[int], str]:
    """:func:`proposed_slices` for a segmentation node of the scene (checked first)."""
    scene_io.check_input_volume(volume_node)
    if segmentation_node is None:
        raise FinetuneInputError("Select the segmentation you corrected.")
    labels, label_set = training_labels(segmentation_node, volume_node)
    return proposed_slices(labels, label_set, predictions.get(segmentation_node))


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class FinetuneRequest:
    """What to learn from: the volume, the corrected segmentation, its corrected K slices, the base model."""

    volume: Any
    segmentation: Any
    slices: list[int]
    base: ModelChoice | None
    mode: str = "fast"
    epochs: int | None = None
    device: str = "auto"
    label_set_name: str = ""
    seed: int = 2345


@dataclass
class ValidationPoint:
    epoch: int
    epochs: int
    dice: float


class FinetuneJob(WorkerJob):
    """A fine-tuning run. After success ``model_path`` is the new model file and ``model_name`` its name (it is in
    the model list from then on); ``validation`` holds the validation Dice per epoch the worker reported."""

    WHAT = "fine-tuning"

    def __init__(self, scene: Any, request: FinetuneRequest, launcher=None, listener=None,
                 temp_root: str | None = None, **kwargs) -> None:
        super().__init__(scene, launcher, listener, temp_root, **kwargs)
        self.request = request
        self.labels: np.ndarray | None = None
        self.label_set: LabelSet | None = None
        self.validation: list[ValidationPoint] = []
        self.model_path: Path | None = None
        self.model_name = ""
        self.progress = ProgressInfo("prepare")

    @property
    def best_validation(self) -> ValidationPoint | None:
        return max(self.validation, key=lambda p: p.dice) if self.validation else None

    def _check(self) -> None:
        req = self.request
        scene_io.check_input_volume(req.volume)
        node = req.segmentation
        if node is None:
            raise FinetuneInputError("Select the corrected segmentation to learn from.")
        if node.GetScene() is not self.scene:
            raise FinetuneInputError(f"the segmentation '{node.GetName()}' is not in the scene")
        if req.mode not in MODES:
            raise FinetuneInputError(f"unknown fine-tuning mode {req.mode!r}; choose fast or full")
        if req.device not in DEVICES:
            raise FinetuneInputError(f"unknown device {req.device!r}; choose one of {', '.join(DEVICES)}")
        if req.epochs is not None and req.epochs < 1:
            raise FinetuneInputError("the number of epochs must be at least 1 (or automatic)")
        if req.base is None:
            raise FinetuneInputError("Select the model to start from.")
        if req.base.problem:
            raise FinetuneInputError(f"the model '{req.base.label}' cannot be fine-tuned: {req.base.problem}")
        dims = req.volume.GetImageData().GetDimensions()
        slices = parse_slice_list(format_slice_list(req.slices or []), dims[2])
        self.labels, self.label_set = training_labels(node, req.volume, req.label_set_name)
        empty = [k for k in slices if not self.labels[k].any()]
        if len(empty) == len(slices):
            raise FinetuneInputError(f"the listed slices ({format_slice_list(slices)}) hold no segment voxel: correct "
                                     "or draw the structures on them first")
        self.request.slices = slices

    def _download_choice(self) -> ModelChoice | None:
        return self.request.base

    def _worker_arguments(self, folder: Path) -> list[str]:
        req = self.request
        assert self.labels is not None and self.label_set is not None
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", req.volume.GetName()).strip("._") or "volume"
        image_path = scene_io.export_volume(req.volume, folder / f"{stem}.nrrd")
        labels_path = scene_io.write_on_volume_grid(self.labels, req.volume, folder / "corrected-labels.nrrd",
                                                    "the corrected labels")
        table_path = folder / "label-table.json"
        table_path.write_text(json.dumps(self.label_set.to_json(), indent=1), encoding="utf-8")
        args = ["finetune", "--image", str(image_path), "--labels", str(labels_path), "--labels-table",
                str(table_path), "--slices", ",".join(str(k) for k in req.slices), "--base", base_argument(req.base),
                "--mode", req.mode, "--device", req.device, "--seed", str(req.seed)]
        if req.epochs:
            args += ["--epochs", str(req.epochs)]
        return args

    def _started_message(self) -> str:
        req = self.request
        return (f"Fine-tuning '{req.base.title}' ({req.mode} mode, device {req.device}) on {len(req.slices)} corrected "
                f"slice(s) of {req.volume.GetName()}: {format_slice_list(req.slices)}.")

    def _on_log(self, message: str) -> None:
        match = _VALIDATION.search(message)
        if match:
            self.validation.append(ValidationPoint(int(match.group(1)), int(match.group(2)), float(match.group(3))))
            self._notify("validation")

    def _use_result(self, result: protocol.Result) -> None:
        path = Path(str(result.output))
        if not path.is_file():
            self._fail(f"the fine-tuning worker reported success but its model file {path} is missing", "internal")
            return
        self.model_path = path
        self.model_name = str(result.model or path.stem)
        for warning in result.warnings or []:
            self._log("warning", str(warning))
        best = self.best_validation
        score = f"; best validation Dice {best.dice:.3f} (epoch {best.epoch})" if best else ""
        self._log("info", f"Fine-tuned model '{self.model_name}' saved in {path.parent}{score}.")
        guided = guided_decision_summary(path)
        if guided:
            self._log("info", guided)
        self._finish(JobState.SUCCEEDED)


def guided_decision_summary(model_path: Path) -> str:
    """One sentence on what the held-out corrected slices decided for the guided re-segmentation (from the
    model file's record; empty when the model was not validated with guidance)."""
    from hsam.weights.modelfile import read_description

    try:
        info = read_description(model_path).provenance.get("finetune", {}).get("guidance") or {}
    except HSAMError:
        return ""
    if not info.get("validation_dice_propagated"):
        return ""
    names = info.get("prior_class_names") or []
    kept = (f"keeps the propagated labels of {', '.join(names)} (they beat the model on the held-out slices)"
            if names else "follows the model for every structure")
    stage = "stage 2 alone" if info.get("decision") == "stage2" else "both stages"
    weight = info.get("decision_weight")
    leaning = f", weighing the propagated labels ×{float(weight):g}" if weight is not None else ""
    return f"Segment again with the corrected slices as guide: {kept}; the model decides with {stage}{leaning}."


def finetune_request(volume: Any, segmentation: Any, slices: Any, base: ModelChoice | None, mode: str = "fast",
                     epochs: int | None = None, device: str = "auto", predictions: PredictionStore | None = None
                     ) -> FinetuneRequest:
    """The request of the Logic's ``finetune``: ``slices`` as K numbers or the text the user typed; the label set
    keeps the name of the prediction the user corrected (so the new model is named after it)."""
    if isinstance(slices, str):
        scene_io.check_input_volume(volume)
        slices = parse_slice_list(slices, volume.GetImageData().GetDimensions()[2])
    prediction = predictions.get(segmentation) if predictions is not None else None
    return FinetuneRequest(volume, segmentation, list(slices or []), base, mode, epochs or None, device,
                           label_set_name=prediction.label_set.name if prediction is not None else "")


def base_argument(choice: ModelChoice) -> str:
    """``--base`` of the worker: a registry id, or the file of a user model / checkpoint."""
    if choice.source in ("user", "file") and choice.checkpoint:
        return str(choice.checkpoint)
    return choice.id
