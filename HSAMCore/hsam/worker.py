"""``python -m hsam.worker``: the background process the Slicer module runs (JSON-lines protocol).

    python -m hsam.worker segment --input IN.nrrd --output OUT.nrrd [--model ID | --checkpoint FILE
        [--sam-checkpoint FILE]] [--device auto] [--batch-size N] [--guide-labels LABELS.nrrd --guide-slices SPEC]
    python -m hsam.worker finetune --image IMG.nrrd --labels LABELS.nrrd --slices 0,10,20-25 [--out FILE]
        [--base MODEL] [--mode fast|full] [--labels-table TABLE] [--epochs N] ... (see ``hsam finetune -h``)

With ``--guide-labels``/``--guide-slices`` the segment run is *guided* (:func:`hsam.engine.guidance.segment_guided`):
the listed k planes of LABELS (corrected slices, on IN's grid) keep their labels and guide the slices around them —
what the Slicer module does after fine-tuning. It reports ``embed`` then ``segment`` progress.

Fine-tuning reports progress per slice encoded (stage ``embed``) and per epoch (stage ``train``), validation
Dice as log lines, and ends with a result whose ``output`` is the new model file (its description holds the
lineage and the validation Dice) and whose ``labels`` are its label set.

stdout carries only protocol lines (``hsam.worker_protocol``); everything else — library output, Python
warnings, tracebacks of internal errors — goes to stderr. The output is a label map on IN's voxel grid,
written atomically; a killed (cancelled) worker leaves no output file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from typing import TextIO

from . import worker_protocol as wp
from .errors import CancelledError, DiskFullError, HSAMError, InputVolumeError, ModelFileError


class ProtocolWriter:
    """Writes protocol messages to the real stdout, one flushed line each."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def send(self, message: wp.Message) -> None:
        self.stream.write(wp.encode(message) + "\n")
        self.stream.flush()


class ProtocolLogHandler(logging.Handler):
    def __init__(self, writer: ProtocolWriter) -> None:
        super().__init__(level=logging.INFO)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning" if record.levelno >= logging.WARNING \
            else "info"
        self.writer.send(wp.Log(message=self.format(record), level=level))


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, DiskFullError):
        return "disk"
    if isinstance(exc, InputVolumeError):
        return "input"
    if isinstance(exc, ModelFileError):
        return "model"
    return "input" if isinstance(exc, HSAMError) else "internal"


def build_parser() -> argparse.ArgumentParser:
    from .segment_cli import add_model_arguments, add_run_arguments

    parser = argparse.ArgumentParser(prog="python -m hsam.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment")
    seg.add_argument("--input", required=True)
    seg.add_argument("--output", required=True)
    add_model_arguments(seg)
    add_run_arguments(seg)
    from .segment_cli import add_guide_arguments

    add_guide_arguments(seg)
    from .finetune_cli import add_finetune_arguments

    ft = sub.add_parser("finetune")
    ft.add_argument("--image", required=True)
    ft.add_argument("--labels", required=True)
    add_finetune_arguments(ft, table_flag="--labels-table")  # --labels is the label map here
    return parser


def run_finetune(args, writer: ProtocolWriter) -> None:
    from pathlib import Path

    from .threads import prefer_passive_openmp

    prefer_passive_openmp()

    from .engine.finetune import finetune
    from .finetune_cli import read_inputs, settings_from_args, summary_lines

    started = time.perf_counter()
    writer.send(wp.Progress(0, 1, stage="load"))
    image, labels, slices, labelset, base, warnings = read_inputs(args.image, args.labels, args.slices,
                                                                  args.label_table, args.base)
    for text in warnings:
        writer.send(wp.Log(text, level="warning"))
    writer.send(wp.Log(f"base model {base.description.name} ({base.description.title or base.source})"))
    result = finetune(image, labels, slices, base, labelset=labelset, settings=settings_from_args(args),
                      progress=lambda done, total, stage: writer.send(wp.Progress(done, total, stage=stage)),
                      out=args.out, name=args.name, image_name=Path(args.image).name, cache=not args.no_cache)
    for line in summary_lines(result):
        writer.send(wp.Log(line))
    writer.send(wp.Result(output=str(result.path), labels=result.description.labels.to_json(),
                          model=result.description.name, warnings=list(warnings),
                          seconds=round(time.perf_counter() - started, 3)))


def run_guided_segment(args, loaded, writer: ProtocolWriter, started: float) -> None:
    """The guided segment run: corrected slices keep their labels and guide the slices around them."""
    from .engine.guidance import segment_guided_file

    segment_guided_file(args.input, args.output, loaded, args.guide_labels, args.guide_slices, device=args.device,
                        progress=lambda done, total, stage: writer.send(wp.Progress(done, total, stage=stage)))
    writer.send(wp.Log(f"guided by the corrected slices {args.guide_slices}, which keep their labels"))
    writer.send(wp.Result(output=str(args.output), labels=loaded.description.labels.to_json(),
                          model=loaded.description.name, seconds=round(time.perf_counter() - started, 3)))


def run_segment(args, writer: ProtocolWriter) -> None:
    from .engine.pipeline import segment_file
    from .segment_cli import load_from_args, run_options

    started = time.perf_counter()
    writer.send(wp.Progress(0, 1, stage="load"))
    loaded = load_from_args(args)
    writer.send(wp.Log(f"model {loaded.description.name} ({loaded.description.title or loaded.source})"))
    if args.guide_labels:
        run_guided_segment(args, loaded, writer, started)
        return
    result = segment_file(args.input, args.output, loaded,
                          progress=lambda done, total: writer.send(wp.Progress(done, total, stage="segment")),
                          **run_options(args))
    writer.send(wp.Result(output=str(args.output), labels=result.labelset.to_json(), model=result.model_name,
                          warnings=list(result.warnings), seconds=round(time.perf_counter() - started, 3)))


def main(argv: list[str] | None = None) -> int:
    writer = ProtocolWriter(sys.stdout)
    sys.stdout = sys.stderr  # anything printed by libraries must not corrupt the protocol stream
    handler = ProtocolLogHandler(writer)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "finetune":
            run_finetune(args, writer)
        else:
            run_segment(args, writer)
        return 0
    except SystemExit as exc:  # argparse: usage errors
        writer.send(wp.Error(message=f"bad worker arguments (exit {exc.code})", kind="internal"))
        return 2
    except HSAMError as exc:
        writer.send(wp.Error(message=str(exc), kind=_error_kind(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        writer.send(wp.Error(message="cancelled", kind="cancelled"))
        return 130
    except MemoryError:
        writer.send(wp.Error(message="out of memory: close other programs, or use a smaller batch size",
                             kind="internal"))
        return 1
    except Exception as exc:  # a bug: the user gets a sentence, the log gets the traceback
        traceback.print_exc(file=sys.stderr)
        writer.send(wp.Error(message=f"internal error ({type(exc).__name__}: {exc}); the details are in the "
                                     "log (stderr)", kind="internal"))
        return 1
    finally:
        root.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
