"""Batch segmentation of a cohort: ``hsam segment IN OUT`` where IN is a folder or a list of volumes.

Inputs (``collect_inputs``)
    * a folder: the image files directly in it (NIfTI ``.nii``/``.nii.gz``, NRRD, MetaImage, InVesalius
      ``.inv3``; see :mod:`hsam.data.volume`) and every folder at or below it that directly holds a DICOM series
      (read as :func:`hsam.data.volume.read_image` reads a DICOM folder: the series with the most slices);
      segmentation outputs (``*.seg.nrrd``), hidden files and the output folder are left out;
    * a list file: ``.txt`` (one path per line; blank lines and ``#`` comments ignored) or ``.csv`` (a column
      named ``input``/``path``/``image``, else the first column; an optional ``output`` column names the
      output file). Relative paths are relative to the list file's folder. A listed path that does not exist
      is kept: it fails on its own, like any other bad volume.

    Inputs are sorted by path. Each gets an output name: its stem (``case01.nii.gz`` -> ``case01``; a DICOM
    folder -> its path below IN, ``/`` -> ``_``) plus the suffix (``.seg.nrrd`` by default, or a label map
    ``.nii.gz``/``.nii``/``.nrrd``/``.mha``). Names that would collide are made unique deterministically.

Sharding (``RankInfo.from_env``)
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun sets them (default 0/1/0). Rank ``r`` of ``W`` takes
    the inputs ``i`` with ``i % W == r`` of the sorted list, so every rank computes the same list and no two
    ranks ever write the same output. With ``--device auto``/``cuda`` and a CUDA machine, each rank uses
    ``cuda:LOCAL_RANK`` (modulo the number of GPUs). Inference needs **no process group**: ranks share
    nothing but the output folder (a shared file system across nodes). Only when torchrun's rendezvous
    variables (``MASTER_ADDR``/``MASTER_PORT``) are present and ``WORLD_SIZE > 1`` is a CPU (gloo) process
    group started, used for one thing: a barrier at the end, after which rank 0 merges the per-rank summaries
    and every rank exits with the cohort's status (so a rank that saw a failure does not make torchrun stop
    ranks that are still working). If it cannot be started, the run goes on without it.

Resuming (``verify_record``)
    Each output is written atomically (a temporary file, then ``os.replace``: ``hsam.data.segfile``), then its
    record ``<output>.done.json`` (also atomically): the input's path, name and fingerprint (size and
    modification time; for a DICOM folder the count, total size and latest modification time of its files),
    the model's fingerprint (SHA-256 of its tensors and of its description minus provenance), the options that
    change labels (orientation, authors' round trip, air skipping), the output's size and SHA-256, the rank
    and timings. A rerun skips an input only if the record exists and parses, the output exists, its size and
    SHA-256 equal the record's, and the input name, input fingerprint, model and options equal this run's;
    otherwise it is segmented again (the old record is removed first, so a crash between the output and its
    record leaves an output without a record, which is redone). ``--no-resume`` redoes everything.

Failures
    An input that cannot be read or segmented (unreadable, 2D, NaN, out of memory, ...) is recorded as
    ``failed`` with a one-line error and the next one starts. The exit code is 1 when anything failed.

Summaries
    Each rank writes ``summary-rank{R}.csv`` (columns ``SUMMARY_FIELDS``), row by row into
    ``summary-rank{R}.partial.csv`` (so a killed rank leaves what it did) and renamed when the rank ends.
    ``summary.csv`` merges them (``merge_summaries``): at the end of a single-process run; with the torchrun
    process group, by rank 0 after the barrier; otherwise by whichever rank finishes last and finds every
    rank's summary (the per-rank files of an earlier run can be merged in if a rank has not started yet; it
    re-merges when it ends). ``hsam segment IN OUT --merge-summaries`` rewrites ``summary.csv`` at any time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import HSAMError

log = logging.getLogger("hsam")

LIST_SUFFIXES = (".txt", ".csv")
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
DEFAULT_SUFFIX = ".seg.nrrd"
RECORD_SUFFIX = ".done.json"
RECORD_VERSION = 1
SUMMARY_FIELDS = ("input", "output", "status", "seconds", "slices", "error", "rank")
MERGED_SUMMARY = "summary.csv"
# Test hook (never set it in production): "N" ends the process (os._exit(137), like SIGKILL) after the record
# of the N-th segmented input is written; "N:output" ends it after the N-th output but before its record.
TEST_EXIT_ENV = "HSAM_COHORT_TEST_EXIT_AFTER"
BARRIER_TIMEOUT_S = 7 * 24 * 3600
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".inv3")
_NOT_IMAGES = (".seg.nrrd", ".seg.nhdr", RECORD_SUFFIX, ".csv", ".txt", ".json", ".md", ".py", ".log", ".raw",
               ".img", ".hdr", ".zraw", ".gz", ".zip", ".tar")


# ------------------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class CohortItem:
    """One input volume and the name of its output file (no folder)."""

    input: Path
    output_name: str


def is_list_file(path: str | os.PathLike) -> bool:
    p = Path(path).expanduser()
    return p.is_file() and p.suffix.lower() in LIST_SUFFIXES


def looks_like_output_file(path: str | os.PathLike) -> bool:
    """True if ``path`` names a single segmentation output (``.seg.nrrd`` or a label map)."""
    return str(path).lower().endswith(OUTPUT_SUFFIXES)


def is_cohort_request(input_path: str | os.PathLike, output_path: str | os.PathLike) -> bool:
    """``hsam segment IN OUT`` is a cohort run when IN is a list file (.txt/.csv), or a folder while OUT does
    not name an output file (a DICOM series folder with OUT ``x.seg.nrrd`` stays one volume)."""
    p = Path(input_path).expanduser()
    if is_list_file(p):
        return True
    return p.is_dir() and not looks_like_output_file(output_path)


def _strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES + (".dcm",):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _is_image_file(path: Path) -> bool:
    lower = path.name.lower()
    if lower.startswith(".") or ".partial" in lower or lower.endswith(_NOT_IMAGES[:3]):
        return False
    return lower.endswith(_IMAGE_SUFFIXES)


def _may_be_dicom(path: Path) -> bool:
    lower = path.name.lower()
    return not lower.startswith(".") and (lower.endswith(".dcm") or not lower.endswith(_IMAGE_SUFFIXES + _NOT_IMAGES))


def _holds_dicom_series(folder: Path, files: Iterable[str]) -> bool:
    if not any(_may_be_dicom(folder / f) for f in files):
        return False
    import SimpleITK as sitk

    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def discover_folder(folder: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The volumes of a cohort folder (see the module docstring), sorted."""
    root = Path(folder).expanduser()
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(here / d) not in excluded)
        if here == root:
            found += [here / f for f in files if _is_image_file(here / f)]
        if _holds_dicom_series(here, files):
            found.append(here)
    return sorted(found, key=str)


def read_list_file(path: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """``(input path, output name or None)`` per entry of a .txt or .csv list (see the module docstring)."""
    path = Path(path).expanduser()
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise HSAMError(f"cannot read the list {path}: {exc}") from exc
    entries: list[tuple[str, str | None]] = []
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        column, out_column = 0, None
        if rows:
            head = [c.strip().lower() for c in rows[0]]
            named = [i for i, c in enumerate(head) if c in ("input", "path", "image", "volume", "file")]
            if named:
                column = named[0]
                out_column = head.index("output") if "output" in head else None
                rows = rows[1:]
        for row in rows:
            if row[0].lstrip().startswith("#") or column >= len(row) or not row[column].strip():
                continue
            out = row[out_column].strip() if out_column is not None and out_column < len(row) else ""
            entries.append((row[column].strip(), out or None))
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, None))
    if not entries:
        raise HSAMError(f"the list {path} names no input volumes")
    result = []
    for text_path, out in entries:
        p = Path(text_path).expanduser()
        result.append((p if p.is_absolute() else base / p, out))
    return result


def _output_name(requested: str, suffix: str) -> str:
    name = Path(requested).name
    return name if looks_like_output_file(name) else _strip_image_suffix(name) + suffix


def name_outputs(inputs: Sequence[Path], suffix: str, root: Path | None = None,
                 requested: dict[Path, str] | None = None) -> list[CohortItem]:
    """Unique output names for ``inputs`` (sorted, deduplicated): see the module docstring."""
    requested = requested or {}
    unique = sorted({Path(os.path.abspath(p)) for p in inputs}, key=str)
    if root is None and unique:
        try:
            root = Path(os.path.commonpath([str(p.parent) for p in unique]))
        except ValueError:
            root = None

    def relative_stem(p: Path) -> str:
        try:
            rel = p.relative_to(root) if root is not None else Path(p.name)
        except ValueError:
            rel = Path(p.name)
        parts = list(rel.parts) or [p.name]
        parts[-1] = _strip_image_suffix(parts[-1])
        return "_".join(parts)

    def first_name(p: Path) -> str:
        if p in requested:
            return _output_name(requested[p], suffix)
        return (relative_stem(p) if p.is_dir() else _strip_image_suffix(p.name)) + suffix

    stems = {p: first_name(p) for p in unique}
    # Collisions: use the path below the common folder, then add the input's format, then a counter.
    for attempt in range(3):
        counts: dict[str, int] = {}
        for name in stems.values():
            counts[name.lower()] = counts.get(name.lower(), 0) + 1
        clashing = [p for p in unique if counts[stems[p].lower()] > 1 and p not in requested]
        if not clashing:
            break
        for n, p in enumerate(clashing):
            if attempt == 0:
                stems[p] = relative_stem(p) + suffix
            elif attempt == 1:
                tag = p.name[len(_strip_image_suffix(p.name)):].strip(".").replace(".", "") or "dir"
                stems[p] = stems[p][: -len(suffix)] + "_" + tag + suffix
            else:
                stems[p] = stems[p][: -len(suffix)] + f"_{n + 1}" + suffix
    counts = {}
    for name in stems.values():
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    dupes = sorted({n for n in stems.values() if counts[n.lower()] > 1})
    if dupes:
        raise HSAMError(f"several inputs would be written to the same output: {', '.join(dupes[:5])}; "
                        "give distinct names in the list's output column")
    return [CohortItem(p, stems[p]) for p in unique]


def collect_inputs(input_path: str | os.PathLike, output_dir: str | os.PathLike,
                   suffix: str = DEFAULT_SUFFIX) -> list[CohortItem]:
    """The cohort's items, sorted by input path: from a folder or a .txt/.csv list."""
    suffix = check_suffix(suffix)
    source = Path(input_path).expanduser()
    if is_list_file(source):
        entries = read_list_file(source)
        requested = {Path(os.path.abspath(p)): out for p, out in entries if out}
        return name_outputs([p for p, _ in entries], suffix, requested=requested)
    if not source.is_dir():
        raise HSAMError(f"{source} is neither a folder nor a .txt/.csv list of volumes")
    found = discover_folder(source, exclude=[output_dir])
    if not found:
        raise HSAMError(f"no volumes found in {source}: expected image files (.nii.gz, .nii, .nrrd, .mha, .inv3) "
                        "directly in it or DICOM series in its subfolders")
    return name_outputs(found, suffix, root=Path(os.path.abspath(source)))


def check_suffix(suffix: str) -> str:
    text = suffix if suffix.startswith(".") else "." + suffix
    if text.lower() not in OUTPUT_SUFFIXES:
        raise HSAMError(f"output suffix {suffix}: use one of {', '.join(OUTPUT_SUFFIXES)}")
    return text


# ----------------------------------------------------------------------------------------------- sharding

@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> "RankInfo":
        env = os.environ if env is None else env
        try:
            rank = int(env.get("RANK", "0"))
            world = int(env.get("WORLD_SIZE", "1"))
            local = int(env.get("LOCAL_RANK", str(rank if world > 1 else 0)))
        except ValueError as exc:
            raise HSAMError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
        if world < 1 or not 0 <= rank < world or local < 0:
            raise HSAMError(f"invalid RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: need 0 <= RANK < "
                            "WORLD_SIZE")
        return cls(rank, world, local)

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""


def shard(items: Sequence[CohortItem], info: RankInfo) -> list[CohortItem]:
    """The items of rank ``info.rank``: every ``world_size``-th of the sorted list."""
    return list(items[info.rank::info.world_size])


def device_for_rank(device: str, info: RankInfo, env=None) -> str:
    """``auto``/``cuda`` under torchrun on a CUDA machine -> ``cuda:LOCAL_RANK`` (modulo the GPU count)."""
    env = os.environ if env is None else env
    text = (device or "auto").strip().lower()
    if text not in ("auto", "cuda") or (info.world_size == 1 and "LOCAL_RANK" not in env):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{info.local_rank % count}" if count else device


# ----------------------------------------------------------------------------------------------- records

def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input: size + modification time (a DICOM folder: over its files)."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
        stats = [f.stat() for f in files]
        return {"kind": "folder", "files": len(files), "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
    st = p.stat()
    return {"kind": "file", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(loaded) -> str:
    """SHA-256 of the model's tensors and of its description (provenance left out)."""
    from .weights.modelfile import content_sha256

    description = loaded.description.to_json()
    description.pop("provenance", None)
    digest = hashlib.sha256(content_sha256(loaded.model.state_dict()).encode())
    digest.update(json.dumps(description, sort_keys=True).encode())
    return digest.hexdigest()


def label_options(options: dict) -> dict:
    """The run options that change the labels (device, batch size and precision do not, by design)."""
    orientation = options.get("orientation")
    return {"orientation": getattr(orientation, "code", orientation),
            "authors_roundtrip": options.get("authors_roundtrip"), "skip_air": options.get("skip_air")}


def record_path(output: Path) -> Path:
    return output.with_name(output.name + RECORD_SUFFIX)


def _atomic_write_text(path: Path, text: str) -> None:
    from .data.segfile import write_text_atomically

    write_text_atomically(path, text)


def verify_record(output: Path, expected: dict) -> tuple[bool, str, dict]:
    """``(done, reason, record)``: whether ``output`` is a verified, current result (module docstring)."""
    record_file = record_path(output)
    if not record_file.exists():
        return False, "no completion record" if output.exists() else "not done", {}
    if not output.exists():
        return False, "its output is missing", {}
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return False, f"its record is unreadable ({exc})", {}
    for key in ("version", "input_name", "input_fingerprint", "model", "options"):
        if record.get(key) != expected.get(key):
            return False, f"its {key.replace('_', ' ')} changed", record
    try:
        size = output.stat().st_size
        if size != record.get("output_bytes"):
            return False, f"its output has {size} bytes, the record says {record.get('output_bytes')}", record
        if sha256_file(output) != record.get("output_sha256"):
            return False, "its output's SHA-256 differs from the record", record
    except OSError as exc:
        return False, f"its output cannot be read ({exc})", record
    return True, "verified", record


def _remove_stale_partials(output: Path) -> None:
    """Temporary files a killed process left for this output (only this rank writes this output)."""
    prefixes = (f".{output.name}.", f".{record_path(output).name}.")
    try:
        for entry in output.parent.iterdir():
            if entry.name.startswith(prefixes) and ".partial" in entry.name:
                try:
                    entry.unlink()
                except OSError:
                    pass
    except OSError:
        pass


def _test_exit(stage: str, count: int) -> None:
    value = os.environ.get(TEST_EXIT_ENV, "")
    if not value:
        return
    number, _, when = value.partition(":")
    if int(number) == count and (when or "record") == stage:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(137)


# ----------------------------------------------------------------------------------------------- summary

def summary_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / f"summary-rank{rank}.csv"


class _SummaryWriter:
    """Rows go to ``summary-rank{R}.partial.csv`` as they come; ``close`` renames it ``summary-rank{R}.csv``."""

    def __init__(self, output_dir: Path, rank: int):
        self.final = summary_path(output_dir, rank)
        self.partial = self.final.with_name(f"summary-rank{rank}.partial.csv")
        try:
            self.final.unlink()
        except FileNotFoundError:
            pass
        self.fh = open(self.partial, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.fh, fieldnames=SUMMARY_FIELDS)
        self.writer.writeheader()
        self.fh.flush()

    def add(self, row: dict) -> None:
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> Path:
        self.fh.close()
        os.replace(self.partial, self.final)
        return self.final


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def completed_ranks(output_dir: str | os.PathLike) -> dict[int, Path]:
    """Rank -> its finished ``summary-rank{R}.csv``."""
    found = {}
    for entry in Path(output_dir).glob("summary-rank*.csv"):
        digits = entry.name[len("summary-rank"):-len(".csv")]
        if digits.isdigit():
            found[int(digits)] = entry
    return found


def merge_summaries(output_dir: str | os.PathLike, world_size: int | None = None) -> tuple[Path, list[int]]:
    """Write ``summary.csv`` from the per-rank summaries (rows sorted by input); returns its path and the
    ranks (of ``world_size``, when given) whose finished summary is missing."""
    output_dir = Path(output_dir)
    done = completed_ranks(output_dir)
    if not done:
        raise HSAMError(f"no per-rank summaries (summary-rank*.csv) in {output_dir}: nothing to merge")
    missing = [r for r in range(world_size) if r not in done] if world_size else []
    ranks = [r for r in sorted(done) if world_size is None or r < world_size]
    rows = [row for rank in ranks for row in read_summary(done[rank])]
    rows.sort(key=lambda r: r.get("input", ""))
    target = output_dir / MERGED_SUMMARY
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
    with open(temp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, target)
    return target, missing


# -------------------------------------------------------------------------------------------------- run

@dataclass
class CohortReport:
    rank: RankInfo
    rows: list[dict] = field(default_factory=list)
    summary: Path | None = None
    merged: Path | None = None
    cohort_failed: int | None = None  # over all ranks, when a process group told us

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def failed(self) -> int:
        return self.count("failed")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, HSAMError) and text else f"{type(exc).__name__}: {text}" if text else \
        type(exc).__name__


class _ProcessGroup:
    """The optional gloo group for the final barrier (see the module docstring)."""

    def __init__(self, info: RankInfo, env=None):
        env = os.environ if env is None else env
        self.dist = None
        if info.world_size < 2 or not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            return
        try:
            import datetime

            import torch.distributed as dist

            if not dist.is_available():
                return
            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size,
                                        timeout=datetime.timedelta(seconds=BARRIER_TIMEOUT_S))
            self.dist = dist
        except Exception as exc:  # noqa: BLE001 - the run goes on without it
            log.warning("no process group (%s): ranks run independently; merge the summaries afterwards with "
                        "`hsam segment IN OUT --merge-summaries`", _one_line(exc))

    def total_failed(self, failed: int) -> int | None:
        if self.dist is None:
            return None
        import torch

        value = torch.tensor([failed], dtype=torch.int64)
        self.dist.all_reduce(value)
        return int(value.item())

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def close(self) -> None:
        if self.dist is not None:
            try:
                self.dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_cohort(items: Sequence[CohortItem], output_dir: str | os.PathLike, loaded, *, options: dict | None = None,
               info: RankInfo | None = None, resume: bool = True, echo: Callable[[str], None] = print,
               process_group: bool = True) -> CohortReport:
    """Segment this rank's share of ``items`` into ``output_dir`` with ``loaded`` (loaded once), skipping
    verified outputs; one failure never stops the rest. Writes ``summary-rank{R}.csv`` (and, see the module
    docstring, ``summary.csv``)."""
    from .engine.pipeline import segment_file

    info = info or RankInfo.from_env()
    options = dict(options or {})
    options["device"] = device_for_rank(options.get("device", "auto"), info)
    output_dir = Path(output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    group = _ProcessGroup(info) if process_group else _ProcessGroup(RankInfo())
    mine = shard(items, info)
    prefix = f"[{info.label}] " if info.label else ""
    echo(f"{prefix}{len(mine)} of {len(items)} volumes for this process -> {output_dir}"
         + (f" (device {options['device']})" if options.get("device") not in (None, "auto") else ""))
    model_hash = model_fingerprint(loaded)
    settings = label_options(options)
    report = CohortReport(info)
    writer = _SummaryWriter(output_dir, info.rank)
    segmented = 0
    try:
        for n, item in enumerate(mine, 1):
            output = output_dir / item.output_name
            started = time.perf_counter()
            row = {"input": str(item.input), "output": str(output), "status": "failed", "seconds": "",
                   "slices": "", "error": "", "rank": info.rank}
            echo(f"{prefix}[{n}/{len(mine)}] {item.input.name} -> {item.output_name}")
            try:
                expected = {"version": RECORD_VERSION, "input_name": item.input.name,
                            "input_fingerprint": input_fingerprint(item.input), "model": model_hash,
                            "options": settings}
            except OSError as exc:
                expected = None
                row["error"] = f"cannot read {item.input}: {exc.strerror or exc}"
            if expected is not None and resume:
                done, reason, record = verify_record(output, expected)
                if done:
                    row.update(status="skipped", seconds=f"{time.perf_counter() - started:.2f}",
                               slices=record.get("slices", ""))
                    echo(f"{prefix}  skipped: already done and verified")
                    report.rows.append(row)
                    writer.add(row)
                    continue
                if reason != "not done":
                    echo(f"{prefix}  redoing: {reason}")
            if expected is not None:
                try:
                    row.update(_segment_one(item, output, loaded, options, expected, info, segment_file,
                                            lambda: segmented + 1))
                except Exception as exc:  # noqa: BLE001 - one bad volume never stops the others
                    row["error"] = _one_line(exc)
                    log.debug("failed on %s", item.input, exc_info=True)
                    _free_accelerator_memory()
                segmented += 1
            row["seconds"] = f"{time.perf_counter() - started:.2f}"
            if row["status"] == "ok":
                echo(f"{prefix}  ok: {row['slices']} slices in {row['seconds']} s")
            else:
                echo(f"{prefix}  FAILED: {row['error']}")
            report.rows.append(row)
            writer.add(row)
            if row["status"] == "ok":
                _test_exit("record", segmented)
    except BaseException:
        writer.fh.close()  # the partial summary stays: what this rank did before it stopped
        raise
    report.summary = writer.close()
    report.cohort_failed = group.total_failed(report.failed) if group.dist is not None else None
    if group.dist is not None:
        if info.rank == 0:
            report.merged, _ = merge_summaries(output_dir, info.world_size)
        group.barrier()
        group.close()
    elif info.world_size == 1:
        report.merged, _ = merge_summaries(output_dir, 1)
    else:
        ranks = completed_ranks(output_dir)
        if all(r in ranks for r in range(info.world_size)):
            report.merged, _ = merge_summaries(output_dir, info.world_size)
    return report


def _segment_one(item, output, loaded, options, expected, info, segment_file, count) -> dict:
    _remove_stale_partials(output)
    record_file = record_path(output)
    if record_file.exists():
        record_file.unlink()  # never leave a record that could vouch for an older or half-replaced output
    begun = time.time()
    result = segment_file(item.input, output, loaded, **options)
    _test_exit("output", count())
    axis = "ijk".index(getattr(result, "skipped_axis", "k") or "k")
    slices = int(result.labels.GetSize()[axis])
    record = dict(expected)
    record.update(input=str(Path(os.path.abspath(item.input))), output=output.name,
                  output_bytes=output.stat().st_size, output_sha256=sha256_file(output), slices=slices,
                  model_name=result.model_name, seconds=round(result.seconds, 3), rank=info.rank,
                  world_size=info.world_size, host=socket.gethostname(), device=result.engine.get("device", ""),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), started_epoch=round(begun, 3),
                  warnings=list(result.warnings))
    _atomic_write_text(record_file, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return {"status": "ok", "slices": slices, "error": ""}


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------------- CLI

def add_cohort_arguments(parser) -> None:
    """Options of ``hsam segment`` that only apply when IN is a folder or a list."""
    group = parser.add_argument_group("cohorts (IN a folder or a .txt/.csv list, OUT a folder; sharded over "
                                      "torchrun's RANK/WORLD_SIZE)")
    group.add_argument("--suffix", default=DEFAULT_SUFFIX,
                       help=f"output file suffix: {', '.join(OUTPUT_SUFFIXES)} (default {DEFAULT_SUFFIX})")
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="segment every input again, even those with a verified output")
    group.add_argument("--merge-summaries", action="store_true",
                       help="only rewrite OUT/summary.csv from the per-rank summaries of an earlier run")


def run_cohort_cli(args) -> int:
    """``hsam segment FOLDER|LIST OUTDIR``: see the module docstring. 0: all done, 1: some inputs failed."""
    from .segment_cli import configure_cli_logging, load_from_args, run_options

    configure_cli_logging(True)  # the engine's per-volume chatter off; warnings stay
    info = RankInfo.from_env()
    output_dir = Path(args.output).expanduser()
    if looks_like_output_file(output_dir) or output_dir.is_file():
        raise HSAMError(f"{args.input} is a folder or list of volumes, so OUT must be a folder, not {args.output}")
    if getattr(args, "merge_summaries", False):
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
        merged, missing = merge_summaries(output_dir, world)
        rows = read_summary(merged)
        failed = sum(1 for r in rows if r["status"] == "failed")
        print(f"wrote {merged}: {len(rows)} rows, {failed} failed"
              + (f"; no finished summary from rank(s) {missing}" if missing else ""))
        return 1 if failed or missing else 0
    items = collect_inputs(args.input, output_dir, getattr(args, "suffix", DEFAULT_SUFFIX))
    loaded = load_from_args(args)
    echo = (lambda text: print(text, flush=True)) if not args.quiet else (lambda text: None)
    report = run_cohort(items, output_dir, loaded, options=run_options(args), info=info,
                        resume=getattr(args, "resume", True), echo=echo)
    prefix = f"[{info.label}] " if info.label else ""
    print(f"{prefix}{report.count('ok')} segmented, {report.count('skipped')} already done, {report.failed} failed "
          f"-> {report.summary}" + (f"; merged {report.merged}" if report.merged else ""), flush=True)
    failed = report.cohort_failed if report.cohort_failed is not None else report.failed
    return 1 if failed else 0
