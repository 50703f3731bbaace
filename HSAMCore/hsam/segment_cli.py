"""``hsam segment``: a volume file or DICOM folder in, a segmentation file out."""

from __future__ import annotations

import argparse
import logging
import sys

from .description import OrientationSpec

DEFAULT_MODEL = "hsam-synapse-10pct"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model NAME | --checkpoint FILE [--sam-checkpoint FILE]`` (shared by segment, worker, bench)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", help=f"registry model or user model name (default {DEFAULT_MODEL}; "
                                       "see `hsam models list`) or a .safetensors model file")
    group.add_argument("--checkpoint", help="a model file (.safetensors) or an official H-SAM .pth")
    parser.add_argument("--sam-checkpoint", help="SAM ViT checkpoint for an official H-SAM .pth")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: automatic)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                        help="auto (default): bf16/fp16 on GPUs, fp32 on CPUs. bf16 on a CPU: the encoder's proj/MLP "
                             "linears in bfloat16 (1.7x faster with native bf16); int8: CPU only, the encoder's "
                             "linears in int8 (2.4x). Both agree less with fp32 than our accuracy gate asks, so they "
                             "are opt-in (see BENCHMARKS.md)")
    parser.add_argument("--orientation", help="override the model's slice orientation: 3 letters for "
                                              "(slice, row, column), e.g. SPL")
    parser.add_argument("--authors-roundtrip", type=int, metavar="PX",
                        help="reproduce the authors' tester: resize each slice to PX (224) and back, bicubic, "
                             "before the model (for comparison with published numbers only)")
    parser.add_argument("--skip-air", dest="skip_air", action=argparse.BooleanOptionalAction, default=None,
                        help="label slices that contain only air (no body) background without running the model "
                             "(default: %s; the skipped slices are listed in the output)" % _skip_air_default())


def _skip_air_default() -> str:
    from .engine.air import SKIP_AIR_DEFAULT  # no torch

    return "on" if SKIP_AIR_DEFAULT else "off"


def add_guide_arguments(parser: argparse.ArgumentParser) -> None:
    """The guided mode (after fine-tuning): corrected slices keep their labels and guide the slices around them."""
    parser.add_argument("--guide-labels", metavar="LABELS",
                        help="guided mode: a label map (or .seg.nrrd) on IN's grid whose --guide-slices are corrected; "
                             "they keep their labels, their labels are propagated onto the slices between them by "
                             "registration and the (fine-tuned) model refines them")
    parser.add_argument("--guide-slices", metavar="SPEC", help="the corrected k planes of --guide-labels, e.g. 0,10,20-25")


def add_segment_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment a CT volume into organs",
        description="Segment IN (NIfTI, NRRD, MetaImage, InVesalius .inv3 or a DICOM folder) into OUT: "
                    "a .seg.nrrd Slicer segmentation (named, coloured, terminology-coded segments) or a "
                    ".nii.gz/.nrrd label map, on IN's exact voxel grid. With IN a folder of volumes or a .txt/.csv "
                    "list and OUT a folder: a resumable cohort run, sharded over torchrun ranks (see hsam.cohort).")
    parser.add_argument("input", metavar="IN")
    parser.add_argument("output", metavar="OUT")
    add_model_arguments(parser)
    add_run_arguments(parser)
    add_guide_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from .cohort import add_cohort_arguments  # IN a folder or .txt/.csv list: a cohort (hsam.cohort)

    add_cohort_arguments(parser)
    parser.set_defaults(func=run_segment)


def configure_cli_logging(quiet: bool) -> None:
    """Send the ``hsam`` logger's messages to stderr ("warning: ..." prefixes for warnings)."""
    logger = logging.getLogger("hsam")
    for handler in [h for h in logger.handlers if getattr(h, "_hsam_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    handler._hsam_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno == logging.WARNING else "error: " if record.levelno >= logging.ERROR \
            else ""
        return prefix + record.getMessage()


def load_from_args(args):
    from .weights.loader import load_model

    model = args.model if args.model or args.checkpoint else DEFAULT_MODEL
    return load_model(model=model, checkpoint=args.checkpoint, sam_checkpoint=args.sam_checkpoint)


def run_options(args) -> dict:
    return dict(device=args.device, batch_size=args.batch_size, precision=args.precision,
                orientation=OrientationSpec.from_code(args.orientation) if args.orientation else None,
                authors_roundtrip=args.authors_roundtrip, skip_air=getattr(args, "skip_air", None))


def run_segment(args) -> int:
    from .data.segfile import is_segmentation_path
    from .engine.pipeline import segment_file
    from .errors import CancelledError

    from .cohort import is_cohort_request, run_cohort_cli

    if getattr(args, "merge_summaries", False) or is_cohort_request(args.input, args.output):
        return run_cohort_cli(args)
    configure_cli_logging(args.quiet)
    if not (is_segmentation_path(args.output) or args.output.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha"))):
        from .errors import HSAMError
        raise HSAMError(f"output {args.output}: use .seg.nrrd (Slicer segmentation) or .nii.gz/.nii/.nrrd/.mha "
                        "(label map)")
    loaded = load_from_args(args)
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=0, unit="slice", desc="segmenting", file=sys.stderr)

    def progress(done: int, total: int, stage: str = "segment") -> None:
        if bar is not None:
            bar.set_description("encoding" if stage == "embed" else "segmenting", refresh=False)
            bar.total = total
            bar.n = done
            bar.refresh()

    if getattr(args, "guide_labels", None):
        from .engine.guidance import segment_guided_file

        try:
            segment_guided_file(args.input, args.output, loaded, args.guide_labels, args.guide_slices,
                                device=args.device, progress=progress)
        finally:
            if bar is not None:
                bar.close()
        print(f"wrote {args.output}: guided by the corrected slices {args.guide_slices} of {args.guide_labels}")
        return 0
    try:
        result = segment_file(args.input, args.output, loaded, progress=progress, **run_options(args))
    except KeyboardInterrupt as exc:
        raise CancelledError("cancelled: nothing was written") from exc
    finally:
        if bar is not None:
            bar.close()
    found = result.present_classes()
    print(f"wrote {args.output}: {len(found)} of {len(result.labelset.classes)} classes found "
          f"({', '.join(found) or 'none'}) in {result.seconds:.1f} s with {result.model_name}")
    return 0
