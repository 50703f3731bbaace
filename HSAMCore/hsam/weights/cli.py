"""``hsam models list|fetch|import|verify``: the model registry on the command line.

No torch here. ``add_models_parser`` mounts the sub-command on the ``hsam`` argparse parser;
``run_models`` runs it and returns the exit code (0 ok, ``HSAMError.exit_code`` (2) with the message on
stderr and no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import IO

from ..errors import HSAMError
from .cache import format_bytes, hsam_home, models_dir
from .download import TqdmProgress
from .registry import ModelStatus, Registry, list_user_models, load_registry

_OUR_WARNINGS = ("TrustOnFirstUseWarning", "CacheWarning")


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``models`` and its sub-commands; sets ``func=run_models`` on the parsed namespace."""
    parser = subparsers.add_parser(
        "models", help="list, download, import and verify model files",
        description="Model files: the registry's models (SAM base, official H-SAM, LiteMedSAM) and yours. "
                    "Files are kept in $HSAM_HOME (default: the per-user cache folder).")
    sub = parser.add_subparsers(dest="models_command", metavar="{list,fetch,import,verify}")
    sub.required = True
    p_list = sub.add_parser("list", help="show the models and whether they are here")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_fetch = sub.add_parser("fetch", help="download a model's files (and those it needs), resuming if interrupted")
    p_fetch.add_argument("model_id", metavar="ID")
    p_fetch.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    p_import = sub.add_parser("import", help="copy a file you already have into the cache, after checking it")
    p_import.add_argument("model_id", metavar="ID")
    p_import.add_argument("file", metavar="FILE")
    p_import.add_argument("--as", dest="file_name", metavar="NAME",
                          help="which file of the model this is (needed only for models with several files)")
    p_verify = sub.add_parser("verify", help="re-check the SHA-256 of a model's files")
    p_verify.add_argument("model_id", metavar="ID")
    p_verify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_models)
    return parser


def run_models(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``hsam models ...``; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    commands = {"list": _list, "fetch": _fetch, "import": _import, "verify": _verify}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return commands[args.models_command](args, out, err)
        except HSAMError as exc:
            print(f"error: {exc}", file=err)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted; a partial download is kept and running the command again resumes it", file=err)
            return 130
        finally:
            for w in caught:
                if type(w.message).__name__ in _OUR_WARNINGS:
                    print(f"warning: {w.message}", file=err)


def _local_state(status: ModelStatus) -> str:
    states = {f.state for f in status.files}
    if "damaged" in states:
        return "damaged"
    if "missing" in states:
        return "missing"
    return "checked" if status.verified else "present"


def _list(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    registry = load_registry()
    statuses = registry.list_models()
    users = list_user_models()
    if args.json:
        doc = {"cache": str(hsam_home()), "models": [s.to_json() for s in statuses],
               "user_models": [u.to_json() for u in users]}
        print(json.dumps(doc, indent=2), file=out)
        return 0
    rows = [("ID", "STATUS", "HERE", "SIZE", "LICENCE", "TITLE")]
    for s in statuses:
        sizes = [spec.size for spec in s.entry.files]
        size = format_bytes(sum(sizes)) if all(x is not None for x in sizes) else "?"
        rows.append((s.entry.id, s.entry.status, _local_state(s), size, s.entry.licence, s.entry.title))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5], file=out)
    print(f"\ncache: {hsam_home()}", file=out)
    if users:
        print(f"your models ({models_dir(create=False)}):", file=out)
        for u in users:
            print(f"  {u.name}  {u.error and 'UNREADABLE: ' + u.error or u.title}", file=out)
    print("HERE: checked = present and SHA-256 verified; present = not yet checked; missing: run "
          "`hsam models fetch ID`", file=out)
    return 0


class _FetchBars:
    """One tqdm bar per file being downloaded."""

    def __init__(self, err: IO[str]) -> None:
        self.err = err
        self.name: str | None = None
        self.bar: TqdmProgress | None = None

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if name != self.name:
            self.close()
            self.name, self.bar = name, TqdmProgress(name, file=self.err)
        assert self.bar is not None
        self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fetch(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    registry: Registry = load_registry()
    entry = registry.get(args.model_id)
    bars = _FetchBars(err)
    try:
        paths = registry.fetch(args.model_id, progress=bars, timeout=args.timeout)
    finally:
        bars.close()
    print(f"{entry.id}: ready ({entry.title}; licence {entry.licence})", file=out)
    for role, path in paths.items():
        print(f"  {role}: {path}", file=out)
    if entry.status != "verified":
        print(f"note: {entry.id} is {entry.status}: {entry.notes}", file=out)
    return 0


def _import(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    registry = load_registry()
    dest = registry.import_file(args.model_id, args.file_name, args.file)
    print(f"imported {args.file} as {dest.name} of {args.model_id}: {dest}", file=out)
    missing = [f for f in registry.status(args.model_id).files if f.state == "missing"]
    for f in missing:
        print(f"still needed: {f.name} of {f.model_id}: {f.message}", file=out)
    return 0


def _verify(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    report = load_registry().verify(args.model_id)
    if args.json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    else:
        for f in report.files:
            detail = f" ({f.message})" if f.message else ""
            print(f"{f.state:9} {f.model_id}/{f.name}  {f.path or '-'}{detail}", file=out)
    if report.ok:
        print(f"{args.model_id}: all files ok", file=out if not args.json else err)
        return 0
    bad = [f for f in report.files if f.state != "ok"]
    print(f"error: {args.model_id}: {len(bad)} file(s) not ok ("
          + ", ".join(f"{f.name}: {f.state}" for f in bad)
          + f"); run `hsam models fetch {args.model_id}` to download missing or damaged files again, or "
            f"`hsam models import {args.model_id} FILE` offline", file=err)
    return HSAMError.exit_code
