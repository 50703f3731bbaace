"""``hsam finetune``: teach a model from a few corrected slices of one volume.

    hsam finetune IMAGE LABELS --slices SPEC [--out FILE] [--base MODEL] [--mode fast|full] [--labels TABLE] ...

LABELS is a label map (or a Slicer ``.seg.nrrd``) on IMAGE's voxel grid; SPEC lists the corrected slices along
IMAGE's third voxel axis k (``0,10,20-25``). The result is a model file ``hsam segment --checkpoint FILE``
accepts (default: a new file in the per-user models folder, usable as ``hsam segment --model NAME``).
Nothing here imports torch at import time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_BASE = "litemedsam-base"


def add_finetune_arguments(parser: argparse.ArgumentParser, table_flag: str = "--labels") -> None:
    """Options shared by ``hsam finetune`` and ``python -m hsam.worker finetune`` (whose label table option is
    ``--labels-table``, its ``--labels`` being the label map)."""
    parser.add_argument("--slices", required=True, metavar="SPEC",
                        help="corrected slices along the image's third voxel axis k, e.g. 0,10,20-25")
    parser.add_argument("--out", metavar="FILE", help="model file to write (.safetensors; default: a new file named "
                                                      "after the model in the per-user models folder)")
    parser.add_argument("--base", default=DEFAULT_BASE, metavar="MODEL",
                        help=f"model to start from: a registry or user model name, or a .safetensors file "
                             f"(default {DEFAULT_BASE}, offline)")
    parser.add_argument("--mode", default="fast", choices=["fast", "full"],
                        help="fast: frozen encoder, cached embeddings, both decoders trained (CPU); full: LoRA + "
                             "decoders, H-SAM's recipe (GPU)")
    parser.add_argument(table_flag, dest="label_table", metavar="TABLE",
                        help="label table naming the classes (JSON, CSV value,name[,r,g,b] or a Slicer .ctbl); "
                             "default: the segments of a .seg.nrrd, else the base model's classes")
    parser.add_argument("--name", help="model name (default: label set name + date)")
    parser.add_argument("--epochs", type=int, help="passes over the training slices (default from --steps)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default 160 fast, 600 full)")
    parser.add_argument("--batch-size", type=int, help="slices per step (default 4 fast, 8 full)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3 fast, 2.5e-3 full)")
    parser.add_argument("--seed", type=int, default=2345, help="random seed (same seed, same result)")
    parser.add_argument("--validation", type=float, default=0.2,
                        help="fraction of corrected slices held out for validation when there are >= 3 (0: none)")
    parser.add_argument("--guidance", type=float,
                        help="share of training batches guided by neighbouring corrected slices (default 0.7; 0 off)")
    parser.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--no-cache", action="store_true", help="do not keep slice embeddings on disk")


def add_finetune_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a model on a few corrected slices",
        description="Fine-tune a model on the corrected slices of one volume: IMAGE (NIfTI, NRRD, DICOM folder, ...) "
                    "and LABELS, a label map or Slicer .seg.nrrd on IMAGE's voxel grid whose slices listed in --slices "
                    "are correct. Writes a new model file; the base model and LABELS are never modified.")
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("labels", metavar="LABELS")
    add_finetune_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="log every epoch (with the progress bars)")
    parser.set_defaults(func=run_finetune)


# ---------------------------------------------------------------------------------------------- inputs

def labelset_from_segmentation(path: str | Path):
    """The label set of a Slicer ``.seg.nrrd`` (segment names, colours, terminology; values 1..N in segment order
    unless every segment has its own label value in one layer). None if the file has no segments."""
    import SimpleITK as sitk

    from .data.labels import LabelClass, LabelSet, Terminology, default_color

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())
    segments = []
    while f"Segment{len(segments)}_ID" in keys:
        n = len(segments)
        get = (lambda key, default="": reader.GetMetaData(f"Segment{n}_{key}") if f"Segment{n}_{key}" in keys
               else default)
        segments.append({"name": get("Name") or get("ID"), "color": get("Color"), "label": get("LabelValue", "1"),
                         "layer": get("Layer", "0"), "tags": get("Tags")})
    if not segments:
        return None
    layers = {s["layer"] for s in segments}
    values = [int(float(s["label"])) for s in segments]
    keep_values = len(layers) == 1 and len(set(values)) == len(values) and all(1 <= v <= 255 for v in values)
    classes = []
    for n, seg in enumerate(segments):
        value = values[n] if keep_values else n + 1
        try:
            color = tuple(int(round(float(c) * 255)) for c in seg["color"].split()[:3])
            if len(color) != 3:
                raise ValueError
        except ValueError:
            color = default_color(value)
        terminology = None
        for tag in seg["tags"].split("|"):
            if tag.startswith("TerminologyEntry:"):
                try:
                    terminology = Terminology.from_slicer_tag(tag[len("TerminologyEntry:"):])
                except ValueError:
                    terminology = None
        classes.append(LabelClass(value=value, name=seg["name"], color=color, terminology=terminology))
    return LabelSet(name=Path(str(path)).name.split(".")[0], classes=tuple(classes))


def labelset_from_values(values, name: str):
    """A label set naming each value ``label N`` (when nothing else names the classes)."""
    from .data.labels import LabelClass, LabelSet, default_color

    values = sorted(int(v) for v in set(values) if int(v) != 0)
    if not values:
        from .errors import InputVolumeError
        raise InputVolumeError("the corrected slices hold no labelled voxel (all background): label the "
                               "structures on them first")
    return LabelSet(name=name, classes=tuple(LabelClass(v, f"label {v}", default_color(v)) for v in values))


def base_needs_labels(base_name: str) -> bool:
    """Whether ``--base`` names a model without trained class heads (the LiteMedSAM base), which needs a label
    set before it can be built. Reads only headers / the registry (no network)."""
    from .weights.loader import _is_our_format
    from .weights.modelfile import read_description
    from .weights.registry import USER_MODEL_SUFFIX, load_registry

    path = Path(base_name)
    if path.is_file():
        if _is_our_format(path):
            return not read_description(path).provenance.get("heads_trained", True)
        from .weights.checkpoints import KIND_LITEMEDSAM, detect_kind, load_torch_checkpoint

        return detect_kind(load_torch_checkpoint(path)) == KIND_LITEMEDSAM
    registry = load_registry()
    if base_name in registry.models:
        return registry.get(base_name).kind == "litemedsam"
    from .weights.cache import models_dir

    user = models_dir(create=False) / f"{base_name}{USER_MODEL_SUFFIX}"
    return user.is_file() and not read_description(user).provenance.get("heads_trained", True)


def load_base(base_name: str, labelset=None):
    """The base model: a registry or user model name, or a file (our .safetensors, or LiteMedSAM's .pth)."""
    from .weights.loader import load_model

    if Path(base_name).is_file():
        return load_model(checkpoint=base_name, labels=labelset)
    return load_model(model=base_name, labels=labelset)


def read_inputs(image_path: str, labels_path: str, slices_spec: str, label_table: str | None, base_name: str):
    """(image, labels (k, j, i), k indices, label set or None = the base's, base LoadedModel, warnings)."""
    import numpy as np

    from .data.labels import LabelSet
    from .data.segfile import is_segmentation_path, read_labels
    from .data.volume import read_image
    from .engine.finetune_data import parse_slice_spec
    from .errors import HSAMError, InputVolumeError

    slices = parse_slice_spec(slices_spec)
    image = read_image(image_path)
    labelset = None
    if label_table:
        try:
            labelset = LabelSet.from_table(label_table)
        except (OSError, ValueError, KeyError) as exc:
            raise HSAMError(f"cannot read the label table {label_table}: {exc}") from exc
    elif is_segmentation_path(labels_path) and Path(labels_path).is_file():
        labelset = labelset_from_segmentation(labels_path)
    labels = read_labels(labels_path, image, labelset if is_segmentation_path(labels_path) else None)
    warnings = []
    if labelset is None and base_needs_labels(base_name):
        outside = [k for k in slices if not 0 <= k < labels.shape[0]]
        if outside:
            raise InputVolumeError(f"slice indices {outside} lie outside the volume: along its third voxel axis (k) "
                                   f"it has {labels.shape[0]} slices, numbered 0..{labels.shape[0] - 1}")
        values = np.unique(np.stack([labels[k] for k in slices]))
        labelset = labelset_from_values(values.tolist(), Path(labels_path).name.split(".")[0] or "labels")
        warnings.append(f"no label table given: the classes are named {', '.join(c.name for c in labelset.classes)}"
                        "; give --labels TABLE (or a .seg.nrrd with named segments) to name them")
    base = load_base(base_name, labelset)
    return image, labels, slices, labelset, base, warnings


def settings_from_args(args):
    from .engine.finetune import FinetuneSettings

    return FinetuneSettings(mode=args.mode, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, validation=args.validation, guidance=args.guidance,
                            device=args.device, precision=args.precision)


def summary_lines(result) -> list[str]:
    """What the user needs after a run: where the model is, how good it looked, how to use it."""
    desc = result.description
    lines = [f"model {desc.name}: {len(result.train_slices)} training slices, {len(result.history)} epochs "
             f"in {result.seconds:.0f} s"]
    if result.validation:
        dice = ", ".join(f"{k} {v:.3f}" for k, v in result.validation.items() if v == v)
        lines.append(f"validation Dice on slices {result.validation_slices}: {dice}")
    if result.path:
        lines.append(f"wrote {result.path}")
        lines.append(f"segment with: hsam segment IN OUT --checkpoint {result.path}")
    return lines


def run_finetune(args) -> int:
    from .threads import prefer_passive_openmp

    prefer_passive_openmp()
    from .engine.finetune import finetune
    from .errors import CancelledError

    from .segment_cli import configure_cli_logging

    configure_cli_logging(quiet=args.quiet or not getattr(args, "verbose", False))
    log = logging.getLogger("hsam")
    image, labels, slices, labelset, base, warnings = read_inputs(args.image, args.labels, args.slices,
                                                                  args.label_table, args.base)
    for text in warnings:
        log.warning(text)
    bar = None
    state = {"stage": None}

    def progress(done: int, total: int, stage: str) -> None:
        nonlocal bar
        if args.quiet:
            return
        from tqdm import tqdm

        if state["stage"] != stage:
            if bar is not None:
                bar.close()
            unit = "slice" if stage == "embed" else "epoch"
            bar = tqdm(total=total, unit=unit, desc="encoding slices" if stage == "embed" else "fine-tuning",
                       file=sys.stderr)
            state["stage"] = stage
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        result = finetune(image, labels, slices, base, labelset=labelset, settings=settings_from_args(args),
                          progress=progress, out=args.out, name=args.name, image_name=Path(args.image).name,
                          cache=not args.no_cache)
    except KeyboardInterrupt as exc:
        raise CancelledError("fine-tuning cancelled: nothing was written, the base model is unchanged") from exc
    finally:
        if bar is not None:
            bar.close()
    for line in summary_lines(result):
        print(line)
    return 0
