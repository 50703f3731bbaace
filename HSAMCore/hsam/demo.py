"""``hsam demo``: the 10 % few-shot case end to end on a real MR volume, offline.

Colin27 T1 with the AAL atlas grouped into 7 structures (Debian ``mricron-data``): the atlas labels of every
10th axial slice are given, H-SAM is fine-tuned from the offline LiteMedSAM base (fast mode), every other slice
of the labelled extent is segmented, and the result is compared with the atlas and with what a Slicer user would
get from the same slices (contour interpolation, nearest-slice copy). Writes into ``--out`` (default
``./hsam-demo``):

    colin27_t1.nii.gz            the volume (so Slicer can load it next to the segmentations)
    colin27_hsam.seg.nrrd        prompt-free H-SAM (given slices + predictions), named, coloured segments
    colin27_hsam_guided.seg.nrrd the guided mode (predictions guided by the neighbouring given slices)
    colin27_atlas.seg.nrrd       the grouped atlas (the reference)
    overlay.png                  atlas vs both predictions, axial / coronal / sagittal
    dice.md, dice.json           Dice per structure and method, timings
    model.safetensors            the fine-tuned model (``hsam segment --checkpoint``)

``--quick`` (CI) runs the same path on a 24-slice window of the extent with every 6th slice given and a few
training steps: it checks the machinery, not the accuracy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

QUICK_WINDOW = 24
QUICK_EVERY = 6
QUICK_STEPS = 6


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="few-shot demo on a real MR volume (Colin27 + AAL, offline)",
        description="Fine-tune H-SAM on every 10th axial slice of the Colin27 T1 (AAL atlas grouped into 7 "
                    "structures), segment the other slices and compare with the atlas and with contour "
                    "interpolation. Needs the Debian package mricron-data.")
    parser.add_argument("--out", default="hsam-demo", metavar="DIR", help="output folder (default ./hsam-demo)")
    parser.add_argument("--every", type=int, default=10, help="give every N-th slice (default 10 = 10 %%)")
    parser.add_argument("--quick", action="store_true",
                        help="CI: a 24-slice window, every 6th slice given, a few steps (same code path)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the fast mode's)")
    parser.add_argument("--data", metavar="DIR", help="folder with ch2.nii.gz, aal.nii.gz, aal.nii.txt "
                                                       "(default /usr/share/mricron/templates)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-baselines", action="store_true", help="skip contour interpolation / nearest copy")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="log every epoch (with the progress bars)")
    parser.set_defaults(func=run_demo)


class _Bar:
    """One tqdm bar per stage (encoding slices, fine-tuning epochs, segmenting)."""

    TITLES = {"embed": ("encoding slices", "slice"), "train": ("fine-tuning", "epoch"),
              "segment": ("segmenting", "slice"), "segment guided": ("segmenting (guided)", "slice")}

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.stage = None

    def __call__(self, done: int, total: int, stage: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            desc, unit = self.TITLES.get(stage, (stage, "step"))
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
            self.stage = stage
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_demo(args) -> int:
    from .threads import prefer_passive_openmp

    prefer_passive_openmp()
    import numpy as np
    import SimpleITK as sitk
    import torch

    from .data.orientation import labels_to_image
    from .data.segfile import write_segmentation
    from .engine.fewshot import (METHODS, base_model, extent_embeddings, load_colin27, markdown_table, results_json,
                                 run_level, write_json)
    from .engine.finetune import FinetuneSettings, autocast_dtype
    from .errors import CancelledError
    from .overlay import write_overlay

    from .segment_cli import configure_cli_logging

    configure_cli_logging(quiet=not args.verbose)  # the bars show progress; warnings still print
    started = time.perf_counter()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    case = load_colin27(args.data)
    every = args.every
    steps = args.steps
    if args.quick:
        middle = case.extent[len(case.extent) // 2]
        case.extent = list(range(middle - QUICK_WINDOW // 2, middle + QUICK_WINDOW // 2))
        every = QUICK_EVERY
        steps = steps or QUICK_STEPS
    settings = FinetuneSettings(steps=steps, device=args.device)
    base = base_model(case.labelset)
    dtype = autocast_dtype(torch.device("cpu"), settings.precision)
    bar = _Bar(args.quiet)
    timings = {}
    try:
        t = time.perf_counter()
        embeddings = extent_embeddings(case, base, dtype, progress=lambda d, n: bar(d, n, "embed"))
        timings["embeddings"] = time.perf_counter() - t
        methods = METHODS if not args.no_baselines else ("hsam", "hsam-guided")
        t = time.perf_counter()
        level = run_level(case, every, methods, base=base, settings=settings, embeddings=embeddings, dtype=dtype,
                          keep_predictions=True, progress=bar, model_out=out / "model.safetensors")
        timings["finetune_and_segment"] = time.perf_counter() - t
    except KeyboardInterrupt as exc:
        raise CancelledError("demo cancelled") from exc
    finally:
        bar.close()

    # the segmentations: given slices as labelled + predictions elsewhere in the extent
    given = np.zeros_like(case.atlas)
    given[level.given] = case.atlas[level.given]
    reference = case.image
    outputs = {}
    for method, filename in (("hsam", "colin27_hsam.seg.nrrd"), ("hsam-guided", "colin27_hsam_guided.seg.nrrd")):
        if method in level.predictions:
            volume = level.predictions[method].copy()
            volume[level.given] = case.atlas[level.given]
            outputs[method] = volume
            write_segmentation(labels_to_image(volume, reference), case.labelset, out / filename,
                               extra_metadata={"HSAM_Model": "demo fine-tuned model", "HSAM_GivenSlices":
                                               ",".join(map(str, level.given))})
    atlas_in_extent = np.zeros_like(case.atlas)
    atlas_in_extent[case.extent] = case.atlas[case.extent]
    write_segmentation(labels_to_image(atlas_in_extent, reference), case.labelset, out / "colin27_atlas.seg.nrrd",
                       extra_metadata={"HSAM_Source": "AAL (Tzourio-Mazoyer et al. 2002) grouped into 7 structures"})
    sitk.WriteImage(case.image, str(out / "colin27_t1.nii.gz"), useCompression=True)
    rows = [("atlas", atlas_in_extent)] + [(("H-SAM" if m == "hsam" else "H-SAM guided"), v)
                                           for m, v in outputs.items()]
    write_overlay(out / "overlay.png", case.image, sitk.GetArrayViewFromImage(case.image), rows, case.labelset,
                  title=f"Colin27 T1: every {every}th axial slice given ({len(level.given)} of {len(case.extent)})")
    timings["total"] = time.perf_counter() - started
    table = markdown_table([level], case.labelset)
    header = (f"# hsam demo: Colin27 T1 + AAL (7 structures), every {every}th slice given"
              f"{' (quick)' if args.quick else ''}\n\n"
              f"Total {timings['total']:.0f} s (embeddings {timings['embeddings']:.0f} s for {len(case.extent)} "
              f"slices, fine-tuning + segmentation {timings['finetune_and_segment']:.0f} s), "
              f"{torch.get_num_threads()} CPU threads.\n\n")
    (out / "dice.md").write_text(header + table, encoding="utf-8")
    write_json(results_json([level], {"quick": args.quick, "timings": timings, "extent": [case.extent[0],
                                                                                         case.extent[-1]]}),
               out / "dice.json")
    print(table)
    print(f"wrote {out}/: colin27_hsam.seg.nrrd, colin27_hsam_guided.seg.nrrd, colin27_atlas.seg.nrrd, "
          f"colin27_t1.nii.gz, overlay.png, dice.md, dice.json, model.safetensors in {timings['total']:.0f} s")
    return 0
