"""Where model files live on this machine: the per-user H-SAM cache.

No torch here (the Slicer panel imports this before torch is installed).

Layout of ``hsam_home()``::

    downloads/<model id>/<file>   files of registry models (downloaded, imported or checked in place)
    models/                       the user's own model files (e.g. fine-tuned ``*.safetensors``)
    manifest.json                 what was checked when: SHA-256 pins, sizes, timestamps

The cache is never inside the installed ``hsam`` package: an install directory may be read-only, shared
between users, or wiped by the next ``pip install``.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import DiskFullError, HSAMError

ENV_HOME = "HSAM_HOME"


def default_cache_root() -> Path:
    """The platform's per-user cache folder for H-SAM (without ``$HSAM_HOME``)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "hsam"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "hsam"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsam"


def package_dir() -> Path:
    """The installed ``hsam`` package folder (never written to)."""
    return Path(__file__).resolve().parent.parent


def hsam_home() -> Path:
    """The H-SAM cache folder: ``$HSAM_HOME`` if set, else the per-user cache folder.

    The folder is not created here. Raises HSAMError if it lies inside the installed package.
    """
    configured = os.environ.get(ENV_HOME, "").strip()
    home = Path(configured).expanduser() if configured else default_cache_root()
    home = Path(os.path.abspath(home))
    pkg = package_dir()
    resolved = home.resolve()
    if resolved == pkg or pkg in resolved.parents:
        origin = f"${ENV_HOME}={configured}" if configured else "the default cache folder"
        raise HSAMError(
            f"the H-SAM cache folder {home} ({origin}) is inside the installed hsam package ({pkg}); "
            "model files must never be written into the install directory (it may be read-only or replaced "
            f"by the next update). Set {ENV_HOME} to a folder outside it, e.g. {default_cache_root()}")
    return home


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; raise HSAMError saying why if that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HSAMError(f"cannot create the folder {path}: {exc.strerror or exc}; check its permissions or set "
                        f"{ENV_HOME} to a writable folder") from exc
    return path


def downloads_dir(create: bool = True) -> Path:
    """Folder holding registry model files (``<home>/downloads``)."""
    path = hsam_home() / "downloads"
    return ensure_dir(path) if create else path


def models_dir(create: bool = True) -> Path:
    """Folder holding the user's own model files, e.g. fine-tuned ones (``<home>/models``)."""
    path = hsam_home() / "models"
    return ensure_dir(path) if create else path


def manifest_path() -> Path:
    """The cache manifest (pins and timestamps)."""
    return hsam_home() / "manifest.json"


def format_bytes(n: int | float | None) -> str:
    """Human-readable size, e.g. ``357.7 MiB``."""
    if n is None:
        return "unknown size"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


def check_free_space(path: Path, needed: int, what: str = "the file") -> None:
    """Raise DiskFullError if fewer than ``needed`` bytes are free where ``path`` will be written."""
    if needed <= 0:
        return
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(
            f"not enough disk space for {what}: it needs {format_bytes(needed)} ({needed} bytes) in "
            f"{Path(path).parent}, but only {format_bytes(free)} ({free} bytes) are free; free some space or "
            f"set {ENV_HOME} to a folder on a larger disk")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``:
    readers see the old or the new content, never a half-written file."""
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        unlink_quietly(Path(tmp))
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFullError(f"the disk is full: could not write {path}; free some space and retry") from exc
        raise


DISK_FULL_ERRNOS = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


def is_disk_full(exc: OSError) -> bool:
    """Whether an OSError means "no space left on device" (or a disk quota is exhausted)."""
    return exc.errno in DISK_FULL_ERRNOS


def unlink_quietly(path: Path) -> None:
    """Delete ``path`` if it exists; ignore errors (used when cleaning up after a failure)."""
    try:
        path.unlink()
    except OSError:
        pass
