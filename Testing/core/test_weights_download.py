"""hsam.weights.download and hsam.weights.cache against a real local HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from weights_testserver import FileServer  # noqa: E402

from hsam.errors import ChecksumError, DiskFullError, DownloadError, HSAMError  # noqa: E402
from hsam.weights import cache, download  # noqa: E402
from hsam.weights.download import (TqdmProgress, download_file, google_drive_url, is_google_drive_url,  # noqa: E402
                                   looks_like_html, part_path)

DATA = os.urandom(50_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture()
def server():
    srv = FileServer()
    srv.files["model.bin"] = DATA
    yield srv
    srv.close()


@pytest.fixture()
def dest(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "model.bin"


def _only_dest(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else []


def test_download_success_with_progress(server, dest):
    calls = []
    result = download_file(server.url("model.bin"), dest, SHA, size=len(DATA),
                           progress=lambda done, total: calls.append((done, total)), timeout=5)
    assert dest.read_bytes() == DATA
    assert result.path == dest and result.sha256 == SHA and result.size == len(DATA) and not result.resumed
    assert calls[0] == (0, len(DATA)) and calls[-1] == (len(DATA), len(DATA))
    assert _only_dest(dest) == ["model.bin"]
    assert server.requests[0]["range"] is None


def test_download_without_known_size_or_checksum(server, dest):
    result = download_file(server.url("model.bin"), dest, None, timeout=5)
    assert result.sha256 == SHA and dest.read_bytes() == DATA


def test_interrupted_download_keeps_part_and_resumes(server, dest):
    server.faults["model.bin"] = {"interrupt_after": 12_345, "times": 1}
    with pytest.raises(DownloadError) as info:
        download_file(server.url("model.bin"), dest, SHA, size=len(DATA), timeout=5)
    message = str(info.value)
    assert "interrupted" in message and "kept" in message and "resume" in message
    assert not dest.exists()
    assert part_path(dest).read_bytes() == DATA[:12_345]

    calls = []
    result = download_file(server.url("model.bin"), dest, SHA, size=len(DATA), timeout=5,
                           progress=lambda done, total: calls.append(done))
    assert server.requests[-1]["range"] == "bytes=12345-"
    assert result.resumed and result.sha256 == SHA
    assert dest.read_bytes() == DATA
    assert calls[0] == 12_345
    assert not part_path(dest).exists()


def test_wrong_checksum_leaves_nothing(server, dest):
    with pytest.raises(ChecksumError) as info:
        download_file(server.url("model.bin"), dest, "0" * 64, size=len(DATA), timeout=5)
    assert "checksum mismatch for model.bin" in str(info.value)
    assert not dest.exists() and not part_path(dest).exists()


def test_wrong_size_is_refused_before_writing(server, dest):
    with pytest.raises(DownloadError, match="should have 10 bytes"):
        download_file(server.url("model.bin"), dest, SHA, size=10, timeout=5)
    assert not dest.exists() and not part_path(dest).exists()


def test_http_404_names_url_and_status(server, dest):
    url = server.url("nothing-here.bin")
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, SHA, timeout=5)
    assert url in str(info.value) and "404" in str(info.value)
    assert not dest.exists() and not part_path(dest).exists()


def test_http_500(server, dest):
    server.faults["model.bin"] = {"status": 503}
    with pytest.raises(DownloadError, match="HTTP 503"):
        download_file(server.url("model.bin"), dest, SHA, timeout=5)


def test_server_ignoring_range_restarts_from_zero(server, dest):
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(b"stale bytes of another attempt")
    server.faults["model.bin"] = {"ignore_range": True}
    result = download_file(server.url("model.bin"), dest, SHA, size=len(DATA), timeout=5)
    assert server.requests[-1]["range"] == "bytes=30-"
    assert not result.resumed
    assert dest.read_bytes() == DATA


def test_416_with_complete_part_finishes(server, dest):
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(DATA)
    result = download_file(server.url("model.bin"), dest, SHA, timeout=5)  # size unknown: asks the server
    assert server.requests[-1]["range"] == f"bytes={len(DATA)}-"
    assert result.sha256 == SHA and dest.read_bytes() == DATA


def test_416_with_stale_part_restarts(server, dest):
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(os.urandom(len(DATA) + 100))
    download_file(server.url("model.bin"), dest, SHA, timeout=5)
    assert dest.read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [f"bytes={len(DATA) + 100}-", None]


def test_complete_part_with_known_size_needs_no_request(server, dest):
    dest.parent.mkdir(parents=True)
    part_path(dest).write_bytes(DATA)
    download_file(server.url("model.bin"), dest, SHA, size=len(DATA), timeout=5)
    assert server.requests == [] and dest.read_bytes() == DATA


def test_disk_full_precheck(server, dest, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskFullError) as info:
        download_file(server.url("model.bin"), dest, SHA, size=len(DATA), timeout=5)
    assert str(len(DATA)) in str(info.value) and "1000 bytes" in str(info.value)
    assert server.requests == []
    assert not dest.exists() and not part_path(dest).exists()


class _FullDisk(io.BufferedWriter):
    """A writer that accepts ``room`` bytes, then fails like a full disk."""

    room = 20_000

    def write(self, data):  # type: ignore[override]
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_disk_full_while_writing_deletes_part(server, dest, monkeypatch):
    monkeypatch.setattr(download, "_open_for_write", lambda path, mode: _FullDisk(io.FileIO(path, mode[0])))
    with pytest.raises(DiskFullError) as info:
        download_file(server.url("model.bin"), dest, SHA, size=len(DATA), timeout=5, chunk_size=8192)
    assert "disk filled up" in str(info.value)
    assert not dest.exists() and not part_path(dest).exists()


def test_html_page_is_detected(server, dest):
    server.faults["model.bin"] = {"html": True}
    with pytest.raises(DownloadError, match="returned a web page"):
        download_file(server.url("model.bin"), dest, None, timeout=5)
    assert not dest.exists() and not part_path(dest).exists()


def test_google_drive_html_page_says_what_to_do(server, dest):
    server.faults["model.bin"] = {"html": True}
    with pytest.raises(DownloadError) as info:
        download_file(server.url("model.bin"), dest, None, timeout=5, google_drive=True)
    message = str(info.value)
    assert message.startswith("Google Drive returned a web page")
    assert "browser" in message and "hsam models import" in message


def test_google_drive_helpers():
    url = google_drive_url("1A1wqTT_FD6FXzqCj9LNStxT425ZfYpnE")
    assert url == ("https://drive.usercontent.google.com/download?id=1A1wqTT_FD6FXzqCj9LNStxT425ZfYpnE"
                   "&export=download&confirm=t")
    assert is_google_drive_url(url) and not is_google_drive_url("https://dl.fbaipublicfiles.com/x.pth")
    with pytest.raises(DownloadError):
        google_drive_url("../etc/passwd")
    assert looks_like_html(b"  <!DOCTYPE html><html>", None)
    assert looks_like_html(b"PK\x03\x04", "text/html; charset=utf-8")
    assert not looks_like_html(b"PK\x03\x04....", "application/octet-stream")
    message = str(download.html_page_error(url, "220_epoch_299.pth", True))
    assert "https://drive.google.com/file/d/1A1wqTT_FD6FXzqCj9LNStxT425ZfYpnE/view" in message


def test_connection_refused(dest):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="could not connect"):
        download_file(f"http://127.0.0.1:{port}/x.bin", dest, SHA, timeout=2)


def test_tqdm_progress_helper():
    out = io.StringIO()
    with TqdmProgress("model.bin", file=out, disable=False) as bar:
        bar(0, 100)
        bar(60, 100)
        bar(100, 100)
    assert "model.bin" in out.getvalue() and "100/100" in out.getvalue()


# ---------------------------------------------------------------------------------------------- cache

def test_hsam_home_override(monkeypatch, tmp_path):
    monkeypatch.setenv("HSAM_HOME", str(tmp_path / "h"))
    assert cache.hsam_home() == tmp_path / "h"
    assert cache.downloads_dir() == tmp_path / "h" / "downloads" and (tmp_path / "h" / "downloads").is_dir()
    assert cache.models_dir() == tmp_path / "h" / "models"


def test_hsam_home_default_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("HSAM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache.hsam_home() == tmp_path / "xdg" / "hsam"
    assert cache.hsam_home().name == "hsam"


def test_hsam_home_inside_package_is_refused(monkeypatch):
    monkeypatch.setenv("HSAM_HOME", str(cache.package_dir() / "weights" / "cache-here"))
    with pytest.raises(HSAMError, match="inside the installed hsam package"):
        cache.hsam_home()


def test_check_free_space_message(monkeypatch, tmp_path):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 50, 50))
    cache.check_free_space(tmp_path / "x", 50)
    with pytest.raises(DiskFullError, match=r"needs .*\(51 bytes\).*\(50 bytes\) are free"):
        cache.check_free_space(tmp_path / "deeper" / "x", 51, what="x")


def test_atomic_write_text(tmp_path):
    target = tmp_path / "m.json"
    cache.atomic_write_text(target, "one")
    cache.atomic_write_text(target, "two")
    assert target.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
