"""The background worker process: start it, read its JSON-lines messages without blocking, kill its whole tree.

The seam is :class:`WorkerProcess` (a ``typing.Protocol``): the segment job only calls ``start``/``poll``/``kill``,
so tests can hand it any object with those methods. :class:`SubprocessWorker` is the real one
(``subprocess.Popen`` + two reader threads + a queue, so ``poll`` never blocks the GUI thread).
:class:`WorkerLauncher` builds the command line (``PythonSlicer -m hsam.worker …`` with the bundled core on
``PYTHONPATH``); pointing it at another script (a fake worker in tests) is a one-argument change.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

from hsam import worker_protocol as protocol

from .corepath import bundled_core_dir

STDERR_TAIL_LINES = 200


# ---------------------------------------------------------------------------------------------- events

@dataclass
class StderrLine:
    """One line the worker wrote on stderr (warnings, tracebacks, library chatter)."""

    text: str


@dataclass
class StdoutGarbage:
    """A stdout line that is not a protocol message (a bug in the worker or a library printing to stdout)."""

    text: str
    reason: str


@dataclass
class Exited:
    """The process ended (always the last event). ``returncode`` as ``Popen.returncode`` (negative = signal)."""

    returncode: int


WorkerEvent = Union[protocol.Progress, protocol.Log, protocol.Result, protocol.Error, StderrLine, StdoutGarbage,
                    Exited]


@runtime_checkable
class WorkerProcess(Protocol):
    """What the segment job needs from a worker process."""

    def start(self) -> None:
        """Launch it (raises OSError / WorkerFailed with a readable message if it cannot start)."""

    def poll(self) -> list[WorkerEvent]:
        """Events since the last call, without blocking; :class:`Exited` is the last event ever returned."""

    def kill(self) -> None:
        """End it and every process it started, now. Safe to call more than once or after it ended."""


# ---------------------------------------------------------------------------------------------- subprocess

class SubprocessWorker:
    """A worker run with ``subprocess.Popen`` in its own process group/session, read by two daemon threads."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._exited = False
        self._killed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def killed(self) -> bool:
        return self._killed

    def start(self) -> None:
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))
        else:
            kwargs["start_new_session"] = True  # own session and process group: killpg reaches every child
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **kwargs)
        readers = [threading.Thread(target=self._read, args=(self.proc.stdout, "out"), daemon=True),
                   threading.Thread(target=self._read, args=(self.proc.stderr, "err"), daemon=True)]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._wait, args=(readers,), daemon=True).start()

    def _read(self, stream, channel: str) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._queue.put((channel, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
        except (OSError, ValueError):  # pipe closed under us (kill)
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _wait(self, readers: list[threading.Thread]) -> None:
        assert self.proc is not None
        returncode = self.proc.wait()
        for reader in readers:  # let the pipes drain (children holding them are killed by kill())
            reader.join(timeout=5.0)
        self._queue.put(("exit", returncode))

    def poll(self) -> list[WorkerEvent]:
        events: list[WorkerEvent] = []
        while not self._exited:
            try:
                channel, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if channel == "out":
                if payload.strip():
                    events.append(decode_line(payload))
            elif channel == "err":
                events.append(StderrLine(payload))
            else:
                self._exited = True
                events.append(Exited(int(payload)))
        return events

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self._killed = True
        kill_process_tree(proc)


def decode_line(line: str) -> WorkerEvent:
    """A stdout line as a protocol message, or :class:`StdoutGarbage` saying why it is not one."""
    try:
        return protocol.decode(line)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return StdoutGarbage(line, str(exc))


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and its descendants (POSIX: its process group; Windows: ``taskkill /T``)."""
    if os.name == "nt":
        try:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: the group id is the worker's pid
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- launcher

def default_python() -> str:
    """The Python that runs the worker: ``PythonSlicer`` inside Slicer, else this interpreter."""
    try:
        from slicer import app  # noqa: F401  (only the desktop application has it)
    except ImportError:
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return str(candidate) if candidate.exists() else sys.executable


@dataclass
class WorkerLauncher:
    """Builds and starts the worker command line.

    The real worker: ``WorkerLauncher()`` → ``[PythonSlicer, "-m", "hsam.worker", *args]``.
    A test double: ``WorkerLauncher(script="fake_worker.py")`` → ``[python, "fake_worker.py", *args]``.
    """

    python: str | None = None
    module: str = "hsam.worker"
    script: str | None = None
    core_dir: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    process_factory: Callable[[list[str], dict[str, str], str | None], WorkerProcess] = SubprocessWorker

    def command(self, args: Sequence[str]) -> list[str]:
        python = self.python or default_python()
        head = [python, str(self.script)] if self.script else [python, "-m", self.module]
        return head + [str(a) for a in args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        core = self.core_dir or str(bundled_core_dir())
        parts = [core] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != core]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"  # messages arrive as they are written
        env["PYTHONIOENCODING"] = "utf-8"
        env.update(self.extra_env)
        return env

    def launch(self, args: Sequence[str], cwd: str | None = None) -> WorkerProcess:
        process = self.process_factory(self.command(args), self.environment(), cwd)
        process.start()
        return process
