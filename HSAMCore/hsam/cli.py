"""The ``hsam`` command. Sub-commands are mounted from their packages (``hsam models`` from
``hsam.weights.cli``); nothing here imports torch, so ``hsam models list`` works before torch is installed.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .bench import add_bench_parser
from .errors import HSAMError
from .demo import add_demo_parser
from .evaluate_cli import add_evaluate_parser
from .finetune_cli import add_finetune_parser
from .segment_cli import add_segment_parser
from .train_cli import add_train_parser
from .weights.cli import add_models_parser


def build_parser() -> argparse.ArgumentParser:
    """The ``hsam`` argument parser with every sub-command mounted."""
    parser = argparse.ArgumentParser(prog="hsam", description="H-SAM prompt-free multi-organ segmentation")
    parser.add_argument("--version", action="version", version=f"hsam {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_segment_parser(subparsers)
    add_finetune_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_models_parser(subparsers)
    add_demo_parser(subparsers)
    add_bench_parser(subparsers)
    add_train_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hsam``; returns the exit code (0 ok, 2 for an HSAMError, printed without a traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
