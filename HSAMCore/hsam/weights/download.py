"""Download one file over HTTP(S), resumably, with progress and SHA-256 verification (urllib only).

No torch here. The protocol of ``download_file``:

1. bytes go to ``<dest>.part``; an existing ``.part`` from an interrupted run is resumed with an HTTP
   ``Range`` request (206 → append; a 200 that ignores the range → start over; 416 → the part is already
   complete, or stale and restarted);
2. when the size is known, free disk space is checked before the first byte; a full disk while writing
   deletes the ``.part`` and raises DiskFullError;
3. after the last byte the SHA-256 is compared; a mismatch deletes the ``.part`` (ChecksumError) and the
   destination never appears; a match renames the ``.part`` onto the destination atomically.

A network failure keeps the ``.part`` and says that running the command again resumes it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from .. import __version__
from ..errors import ChecksumError, DiskFullError, DownloadError
from .cache import check_free_space, ensure_dir, format_bytes, is_disk_full, unlink_quietly

ProgressCallback = Callable[[int, "int | None"], None]
"""Called as ``progress(bytes_done, bytes_total)``; ``bytes_total`` is None when unknown."""

CHUNK_SIZE = 1 << 20
DEFAULT_TIMEOUT = 60.0

GOOGLE_DRIVE_DOWNLOAD = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
GOOGLE_DRIVE_HOSTS = ("drive.google.com", "drive.usercontent.google.com", "docs.google.com")
_DRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{10,200}$")


@dataclass(frozen=True)
class DownloadResult:
    """A completed download: where it is, its SHA-256 (hex), its size and whether a ``.part`` was resumed."""

    path: Path
    sha256: str
    size: int
    resumed: bool


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` accumulate until the download is complete and verified."""
    return dest.with_name(dest.name + ".part")


def sha256_file(path: Path, chunk_size: int = CHUNK_SIZE) -> str:
    """SHA-256 (hex) of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- Google Drive

def google_drive_url(file_id: str) -> str:
    """Direct-download URL of a public Google Drive file (skips the virus-scan page for large files)."""
    if not _DRIVE_ID.match(file_id or ""):
        raise DownloadError(f"{file_id!r} is not a Google Drive file id (letters, digits, '-' and '_' only)")
    return GOOGLE_DRIVE_DOWNLOAD.format(id=file_id)


def is_google_drive_url(url: str) -> bool:
    """Whether ``url`` points at Google Drive."""
    return (urllib.parse.urlsplit(url).hostname or "").lower() in GOOGLE_DRIVE_HOSTS


def looks_like_html(first_bytes: bytes, content_type: str | None) -> bool:
    """Whether a response is a web page rather than a binary file (by its type or its first bytes)."""
    if content_type and content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    head = first_bytes[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def html_page_error(url: str, file_name: str, google_drive: bool) -> DownloadError:
    """The error for a server that answered with a web page instead of ``file_name``."""
    if google_drive:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        file_id = (query.get("id") or [""])[0]
        page = f"https://drive.google.com/file/d/{file_id}/view" if file_id else url
        return DownloadError(
            f"Google Drive returned a web page instead of {file_name} (a sign-in, quota or virus-scan page; "
            f"Drive limits automated downloads). Download it in a browser from {page} and run "
            f"`hsam models import MODEL_ID FILE` with the downloaded file")
    return DownloadError(
        f"{url} returned a web page instead of {file_name}; the address may have moved or need a sign-in. "
        "Download the file in a browser and run `hsam models import MODEL_ID FILE`")


# ---------------------------------------------------------------------------------------------- downloads

def download_file(url: str, dest: str | os.PathLike, sha256: str | None, size: int | None = None,
                  progress: ProgressCallback | None = None, timeout: float = DEFAULT_TIMEOUT, *,
                  google_drive: bool | None = None, chunk_size: int = CHUNK_SIZE) -> DownloadResult:
    """Download ``url`` to ``dest`` and return what was written.

    ``sha256`` (hex) is checked after the last byte; None skips the check (the caller pins the returned
    digest, trust on first use). ``size`` (bytes), when known, enables the free-space check and a size check.
    ``google_drive`` selects Drive-specific error messages (default: guessed from the URL).

    Raises DownloadError (HTTP status, network; a partial file is kept for resuming), DiskFullError,
    ChecksumError (the partial file is deleted; ``dest`` is not created).
    """
    dest = Path(dest)
    part = part_path(dest)
    ensure_dir(dest.parent)
    expected = sha256.lower() if sha256 else None
    drive = is_google_drive_url(url) if google_drive is None else google_drive

    for _ in range(3):  # a stale .part the server cannot resume is dropped and the download restarted
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            unlink_quietly(part)
            have = 0
        if size is not None and have == size:
            return _finish(part, dest, url, _hash_existing(part), have, expected, size, resumed=True)
        if size is not None:
            check_free_space(dest, size - have, what=dest.name)

        response = _open(url, have, timeout)
        if isinstance(response, urllib.error.HTTPError):  # 416: nothing left to send from offset `have`
            total = _content_range_total(response.headers.get("Content-Range"))
            response.close()
            if total == have:
                return _finish(part, dest, url, _hash_existing(part), have, expected, size, resumed=True)
            unlink_quietly(part)
            continue
        with response:
            outcome = _receive(response, url, dest, part, have, size, expected, progress, drive, chunk_size)
        if outcome is not None:
            return outcome
    raise DownloadError(f"the server at {url} kept refusing to resume {dest.name}; delete {part} and retry")


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse | urllib.error.HTTPError:
    """Send the GET (with a Range header when resuming). Returns the 416 error for the caller to handle."""
    headers = {"User-Agent": f"hsam/{__version__}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    # Loopback addresses (site mirrors, tests) never go through a proxy from the environment.
    loopback = (urllib.parse.urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else None
    try:
        if opener is not None:
            return opener.open(request, timeout=timeout)
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (registry URLs, http/https)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:
            return exc
        exc.close()
        raise DownloadError(_status_message(url, exc.code, str(exc.reason))) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        kept = " (the partial file is kept; a rerun resumes it)" if start else ""
        raise DownloadError(f"could not connect to {url}: {reason}{kept}; check the network connection (or a "
                            "proxy via $HTTPS_PROXY) and run the command again; offline, copy the file here "
                            "and run `hsam models import MODEL_ID FILE`") from exc


def _status_message(url: str, status: int, reason: str) -> str:
    if status == 404:
        hint = ("the file is not at this address (any more); update hsam, or get the file another way and run "
                "`hsam models import MODEL_ID FILE`")
    elif status in (401, 403):
        hint = "the server refused access; download the file in a browser and run `hsam models import MODEL_ID FILE`"
    elif status >= 500:
        hint = "the server has a problem; try again later"
    else:
        hint = "try again later, or get the file another way and run `hsam models import MODEL_ID FILE`"
    return f"download of {url} failed: HTTP {status} {reason}; {hint}"


def _receive(response: http.client.HTTPResponse, url: str, dest: Path, part: Path, have: int, size: int | None,
             expected: str | None, progress: ProgressCallback | None, drive: bool,
             chunk_size: int) -> DownloadResult | None:
    """Stream one response into the ``.part``; None means "restart the download from byte 0"."""
    status = response.status
    length = _int_or_none(response.headers.get("Content-Length"))
    if status == 206:
        start = _content_range_start(response.headers.get("Content-Range"))
        if start != have:  # the server sent a different range than asked: do not trust the part
            unlink_quietly(part)
            return None
        total = _content_range_total(response.headers.get("Content-Range"))
        if total is None and length is not None:
            total = have + length
        resumed = have > 0
    elif 200 <= status < 300:
        have, resumed = 0, False  # a 200 to a Range request ignores the range: start over
        total = length
    else:
        raise DownloadError(_status_message(url, status, response.reason))

    if size is not None and total is not None and total != size:
        unlink_quietly(part)
        raise DownloadError(
            f"the server at {url} offers {total} bytes but {dest.name} should have {size} bytes: the file there is "
            "not the expected one (it may have been replaced); update hsam, or get the right file another way "
            "and run `hsam models import MODEL_ID FILE`")
    if size is None and total is not None:
        check_free_space(dest, total - have, what=dest.name)

    first = _read(response, chunk_size, url, dest, part, have, total)
    if have == 0 and looks_like_html(first, response.headers.get("Content-Type")):
        raise html_page_error(url, dest.name, drive)

    digest = hashlib.sha256()
    if have:
        _hash_into(part, digest)
    done = have
    if progress:
        progress(done, total)
    try:
        fh = _open_for_write(part, "ab" if have else "wb")
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}; check the folder's permissions") from exc
    chunk = first
    try:
        while chunk:
            _write(fh, chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
            chunk = _read(response, chunk_size, url, dest, part, done, total, fh)
        fh.flush()
        os.fsync(fh.fileno())
    except OSError as exc:
        fh.close()
        if is_disk_full(exc):
            unlink_quietly(part)
            raise DiskFullError(_disk_full_message(dest, part, done, total)) from exc
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}; check the disk and run the command "
                            "again (the partial file is kept and will be resumed)") from exc
    finally:
        if not fh.closed:
            fh.close()

    if total is not None and done < total or total is None and size is not None and done < size:
        raise DownloadError(_interrupted_message(url, dest, part, done, total or size, "the connection closed early"))
    return _finish(part, dest, url, digest.hexdigest(), done, expected, size, resumed)


def _read(response: http.client.HTTPResponse, chunk_size: int, url: str, dest: Path, part: Path, done: int,
          total: int | None, fh: IO[bytes] | None = None) -> bytes:
    """Read the next chunk; a network failure becomes a DownloadError that keeps the ``.part``."""
    try:
        return response.read(chunk_size)
    except (OSError, http.client.HTTPException, urllib.error.URLError) as exc:
        if fh is not None:
            fh.flush()
            fh.close()
        raise DownloadError(_interrupted_message(url, dest, part, done, total, str(exc) or type(exc).__name__)) \
            from exc


def _write(fh: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        written = fh.write(view)
        if written is None:  # unbuffered raw writers may return None for "all"
            break
        view = view[written:]


def _open_for_write(path: Path, mode: str) -> BinaryIO:
    """Open the ``.part`` file (a seam tests replace to simulate a full disk)."""
    return open(path, mode)  # noqa: SIM115 (closed by the caller)


def _interrupted_message(url: str, dest: Path, part: Path, done: int, total: int | None, reason: str) -> str:
    of = f" of {format_bytes(total)}" if total is not None else ""
    kept = (f"the partial file is kept at {part} and running the same command again resumes it" if done
            else "nothing was saved; run the same command again")
    return (f"download of {dest.name} from {url} was interrupted after {format_bytes(done)}{of} ({reason}); "
            f"{kept}")


def _disk_full_message(dest: Path, part: Path, done: int, total: int | None) -> str:
    need = f"; it needs {format_bytes(total)} ({total} bytes)" if total is not None else ""
    return (f"the disk filled up while downloading {dest.name} after {format_bytes(done)}{need}; the partial file "
            f"{part} was deleted. Free some space (or set HSAM_HOME to a larger disk) and run the command again")


def _finish(part: Path, dest: Path, url: str, digest: str, done: int, expected: str | None, size: int | None,
            resumed: bool) -> DownloadResult:
    """Check size and SHA-256 of the complete ``.part``, then rename it onto ``dest``."""
    if size is not None and done != size:
        unlink_quietly(part)
        raise ChecksumError(
            f"size mismatch for {dest.name}: got {done} bytes from {url}, expected {size}; the download is damaged "
            "or the file at the source changed. The partial file was deleted; run the command again")
    if expected is not None and digest != expected:
        unlink_quietly(part)
        raise ChecksumError(
            f"checksum mismatch for {dest.name}: SHA-256 {digest} of the downloaded file differs from the expected "
            f"{expected}; the download is damaged or the file at {url} changed. The partial file was deleted and "
            "nothing was installed; run the command again, and if it fails again, get the file another way and "
            "run `hsam models import MODEL_ID FILE`")
    os.replace(part, dest)
    return DownloadResult(path=dest, sha256=digest, size=done, resumed=resumed)


def _hash_existing(part: Path) -> str:
    digest = hashlib.sha256()
    _hash_into(part, digest)
    return digest.hexdigest()


def _hash_into(path: Path, digest: hashlib._Hash) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)


def _content_range_start(header: str | None) -> int | None:
    match = _CONTENT_RANGE.match(header or "")
    return int(match.group(1)) if match and match.group(1) is not None else None


def _content_range_total(header: str | None) -> int | None:
    match = _CONTENT_RANGE.match(header or "")
    return int(match.group(3)) if match and match.group(3) != "*" else None


# ---------------------------------------------------------------------------------------------- progress bars

class TqdmProgress:
    """A ``ProgressCallback`` drawing a tqdm bar (bytes, scaled units) on stderr; use as a context manager."""

    def __init__(self, desc: str, file: IO[str] | None = None, disable: bool | None = None) -> None:
        self.desc = desc
        self.file = file
        self.disable = disable
        self._bar = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from tqdm import tqdm  # imported lazily: only the CLI draws bars

            self._bar = tqdm(total=total, initial=done, desc=self.desc, unit="B", unit_scale=True,
                             unit_divisor=1024, file=self.file or sys.stderr, disable=self.disable, leave=True,
                             dynamic_ncols=True)
            return
        if total is not None and self._bar.total != total:
            self._bar.total = total
        if done < self._bar.n:  # restarted from zero
            self._bar.reset(total=total)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
