"""A local HTTP file server for the weights tests: 127.0.0.1 only, Range support, switchable faults.

Faults per path (``server.faults[path] = {...}``):
    ``status``: answer with this HTTP error status
    ``html``: answer with a web page (``text/html``) instead of the file
    ``ignore_range``: answer 200 with the whole file even to a Range request
    ``interrupt_after``: send only this many body bytes, then close the connection
    ``times``: how many requests the fault applies to (default: all)
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        owner = self.server.owner
        path = self.path.lstrip("/")
        range_header = self.headers.get("Range")
        owner.requests.append({"path": path, "range": range_header})
        fault = owner.take_fault(path)
        if fault.get("status"):
            self.send_error(fault["status"])
            return
        if fault.get("html"):
            page = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if path not in owner.files:
            self.send_error(404)
            return
        data = owner.files[path]
        start = 0
        match = re.match(r"bytes=(\d+)-$", range_header or "")
        if match and not fault.get("ignore_range"):
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = fault.get("interrupt_after")
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer


class FileServer:
    """Serve ``files`` (path → bytes) on a random free port of 127.0.0.1 from a background thread."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, dict] = {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def take_fault(self, path: str) -> dict:
        with self._lock:
            fault = self.faults.get(path)
            if not fault:
                return {}
            if "times" in fault:
                fault["times"] -= 1
                if fault["times"] <= 0:
                    del self.faults[path]
            return dict(fault)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
