"""One background run of the core (``WorkerJob``) and the "Segment organs" run (``SegmentJob``), as state machines
the Logic starts and something polls (the fine-tuning run, ``finetune.FinetuneJob``, is the other kind).

    job = SegmentJob(scene, request, launcher)
    job.start()          # checks (raise readable errors; nothing changed yet), then download or launch
    while job.poll():    # the Widget calls poll() from a qt.QTimer; scripts call job.wait()
        ...
    job.state, job.result_node, job.error_message

States: created → (downloading →) running → importing → succeeded | failed | cancelled. Only the importing step
touches the scene, on the thread that calls ``poll`` (the GUI thread), and it builds the new segmentation fully
before adding it; a failed or cancelled run therefore leaves the scene exactly as it was.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hsam import worker_protocol as protocol
from hsam.errors import CancelledError, HSAMError

from . import scene_io
from .errors import SegmentInputError, WorkerFailed
from .models import ModelChoice, fetch_weights
from .process import Exited, StderrLine, StdoutGarbage, WorkerLauncher, WorkerProcess

DEVICES = ("auto", "cpu", "cuda", "mps")
STAGE_TITLES = {"download": "Downloading weights", "load": "Loading the model", "prepare": "Preparing the volume",
                "segment": "Segmenting", "write": "Writing the result", "import": "Creating the segmentation",
                "embed": "Encoding the corrected slices", "train": "Fine-tuning", "save": "Saving the model"}
COUNTED_STAGES = {"segment": "slices", "embed": "slices", "train": "epochs"}
"""Worker stages whose progress counts something (others with total <= 1 show as "busy")."""
log = logging.getLogger("HSAMSegment")


class JobState(str, enum.Enum):
    CREATED = "created"
    DOWNLOADING = "downloading"
    RUNNING = "running"
    IMPORTING = "importing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class SegmentRequest:
    """What to segment and where the result goes (``output`` None: a new segmentation node). With
    ``guide_labels`` ((k, j, i) on the volume's grid) and ``guide_slices`` (their corrected K slices) the run is
    guided: those slices keep their labels and guide the slices around them (after fine-tuning)."""

    volume: Any
    model: ModelChoice
    output: Any | None = None
    device: str = "auto"
    show3d: bool = True
    batch_size: int | None = None
    name: str = ""
    guide_labels: Any = None
    guide_slices: list[int] | None = None


@dataclass
class ProgressInfo:
    """What the progress bar shows. ``total`` 0 means "busy, amount unknown"."""

    stage: str
    done: int = 0
    total: int = 0
    seconds_left: float | None = None
    unit: str = "slices"

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total else None

    @property
    def text(self) -> str:
        title = STAGE_TITLES.get(self.stage, self.stage.capitalize() if self.stage else "Working")
        if not self.total:
            return f"{title}…"
        if self.unit == "bytes":
            amount = f"{self.done / 2**20:.0f} of {self.total / 2**20:.0f} MB"
        else:
            amount = f"{self.done} of {self.total} {self.unit}"
        left = f", {format_duration(self.seconds_left)} left" if self.seconds_left is not None else ""
        return f"{title}: {amount}{left}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"about {max(seconds, 1)} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"about {minutes} min {seconds:02d} s" if minutes < 10 else f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes:02d} min"


class ProgressEstimator:
    """Time left from the rate since the first report of the current stage (needs 2 reports and 1 s)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._stage: str | None = None
        self._start: tuple[float, int] | None = None

    def update(self, stage: str, done: int, total: int) -> float | None:
        now = self.clock()
        if stage != self._stage or self._start is None or done < self._start[1]:
            self._stage, self._start = stage, (now, done)
            return None
        t0, d0 = self._start
        if done <= d0 or now - t0 < 1.0 or not total:
            return None
        rate = (done - d0) / (now - t0)
        return max(0.0, (total - done) / rate)


def describe_exit(returncode: int) -> str:
    """What an exit status without an error message means, in words."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == getattr(signal, "SIGKILL", 9):
            return ("was killed (SIGKILL), most often because the computer ran out of memory; close other programs, "
                    "choose the CPU device or a smaller batch size, and try again")
        if number == getattr(signal, "SIGSEGV", 11):
            return "crashed (segmentation fault in a native library, e.g. the GPU driver)"
        return f"was stopped by {name}"
    if os.name == "nt" and returncode >= 0xC0000000:
        return f"crashed (Windows error 0x{returncode:08X})"
    return f"stopped with exit code {returncode} without reporting an error"


Listener = Callable[["WorkerJob", str], None]
"""Called as ``listener(job, what)`` with what = "progress" | "log" | "state" (| "validation" for fine-tuning)
after each change."""


class WorkerJob:
    """A run of ``python -m hsam.worker``: pre-flight checks, weights download, the worker process, the step that
    uses its result. Subclasses say what to check (``_check``), which model may need downloading
    (``_download_choice``), how to start the worker (``_worker_arguments``) and what to do with its result
    (``_use_result``, the only step that may touch the scene)."""

    WHAT = "worker"  # "the <WHAT> worker stopped…" in messages

    def __init__(self, scene: Any, launcher: WorkerLauncher | None = None, listener: Listener | None = None,
                 temp_root: str | None = None, fetch: Callable[..., None] = fetch_weights,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scene = scene
        self.launcher = launcher or WorkerLauncher()
        self.listener = listener
        self.temp_root = temp_root
        self.fetch = fetch
        self.clock = clock
        self.state = JobState.CREATED
        self.progress = ProgressInfo("prepare")
        self.log_lines: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.error_message = ""
        self.error_kind = ""
        self.result_node: Any = None
        self.process: WorkerProcess | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self.garbage: list[str] = []
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._tmp: Path | None = None
        self._result: protocol.Result | None = None
        self._error: protocol.Error | None = None
        self._estimator = ProgressEstimator(clock)
        self._downloads: queue.Queue = queue.Queue()
        self._cancel_download = threading.Event()

    # ------------------------------------------------------------------------------------------ public
    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or self.clock()) - self.started_at

    def start(self) -> "SegmentJob":
        """Check everything that can be checked, then start the download or the worker. Raises a readable
        :class:`HSAMError` (and changes nothing) if the run cannot start."""
        if self.state is not JobState.CREATED:
            raise RuntimeError(f"a {type(self).__name__} can be started once")
        self._check()
        self.started_at = self.clock()
        base = self.temp_root or tempfile.gettempdir()
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix="HSAMSegment-", dir=base))
        except OSError as exc:
            raise HSAMError(f"cannot create a temporary folder in {base}: {exc.strerror or exc}; check the "
                            "temporary folder in Application Settings") from exc
        try:
            choice = self._download_choice()
            if choice is not None and choice.needs_download:
                self._start_download(choice)
            else:
                self._launch()
        except BaseException:
            self._cleanup()
            raise
        return self

    def poll(self) -> bool:
        """Advance the job (non-blocking); True while it is not finished. Call from the GUI thread."""
        if self.finished:
            return False
        try:
            if self.state is JobState.DOWNLOADING:
                self._poll_download()
            elif self.state is JobState.RUNNING and self.process is not None:
                for event in self.process.poll():
                    self._handle(event)
                    if self.finished or self.state is not JobState.RUNNING:
                        break
        except HSAMError as exc:
            self._fail(str(exc), getattr(exc, "kind", "internal"))
        except Exception as exc:  # a bug here must not leave a job running for ever
            log.exception("HSAMSegment: unexpected error while running")
            self._fail(f"unexpected error ({type(exc).__name__}: {exc}); details are in the Python console", "internal")
        return not self.finished

    def cancel(self) -> None:
        """Stop now: kill the worker's process tree (or abandon the download); the scene is not changed."""
        if self.finished:
            return
        self._cancel_download.set()
        if self.process is not None:
            self.process.kill()
        self._log("info", "Cancelled; the scene was not changed.")
        self._finish(JobState.CANCELLED)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> "SegmentJob":
        """Poll until finished (scripts and tests). On timeout the run is cancelled and WorkerFailed raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise WorkerFailed(f"the segmentation did not finish within {timeout:.0f} s and was cancelled",
                                   "timeout")
            time.sleep(interval)
        return self

    # ------------------------------------------------------------------------------------------ steps
    def _start_download(self, choice: ModelChoice) -> None:
        self._set_state(JobState.DOWNLOADING)
        self._log("info", f"Downloading the weights of '{choice.title}' (checked with SHA-256, cached for later runs)…")
        self._set_progress(ProgressInfo("download", 0, 0, unit="bytes"))

        def progress(name: str, done: int, total: int | None) -> None:
            if self._cancel_download.is_set():
                raise CancelledError("download cancelled")
            self._downloads.put(("progress", name, done, total or 0))

        def run() -> None:
            try:
                self.fetch(choice, progress)
                self._downloads.put(("done",))
            except BaseException as exc:  # reported on the GUI thread
                self._downloads.put(("error", exc))

        threading.Thread(target=run, name="HSAMSegment-download", daemon=True).start()

    def _poll_download(self) -> None:
        while True:
            try:
                item = self._downloads.get_nowait()
            except queue.Empty:
                return
            if item[0] == "progress":
                _, name, done, total = item
                left = self._estimator.update("download:" + name, done, total) if total else None
                self._set_progress(ProgressInfo("download", done, total, left, unit="bytes"))
            elif item[0] == "done":
                self._log("info", "Weights downloaded and checked.")
                self._launch()
                return
            else:
                exc = item[1]
                if isinstance(exc, HSAMError):
                    self._fail(f"the weights could not be downloaded: {exc}", "model")
                else:
                    log.error("HSAMSegment: download failed", exc_info=exc)
                    self._fail(f"the weights could not be downloaded ({type(exc).__name__}: {exc})", "model")
                return

    def _launch(self) -> None:
        assert self._tmp is not None
        self._set_progress(ProgressInfo("prepare"))
        args = self._worker_arguments(self._tmp)
        try:
            self.process = self.launcher.launch(args, cwd=str(self._tmp))
        except OSError as exc:
            raise WorkerFailed(f"the {self.WHAT} worker could not be started ({exc.strerror or exc}); reinstall "
                               "the HSAMExtension if this persists") from exc
        self._set_state(JobState.RUNNING)
        self._set_progress(ProgressInfo("load"))
        self._log("info", self._started_message())

    def _handle(self, event: Any) -> None:
        if isinstance(event, protocol.Progress):
            total, done = max(0, int(event.total)), max(0, int(event.done))
            if event.stage not in COUNTED_STAGES and total <= 1:  # a phase without steps to count: show "busy"
                total = done = 0
            left = self._estimator.update(event.stage, done, total)
            unit = COUNTED_STAGES.get(event.stage, "steps")
            self._set_progress(ProgressInfo(event.stage, done, total, left, unit=unit))
        elif isinstance(event, protocol.Log):
            self._log(event.level if event.level in ("info", "warning", "error") else "info", str(event.message))
            self._on_log(str(event.message))
        elif isinstance(event, protocol.Result):
            self._result = event
        elif isinstance(event, protocol.Error):
            self._error = event
        elif isinstance(event, StderrLine):
            self.stderr_tail.append(event.text)
            log.debug("hsam.worker: %s", event.text)
        elif isinstance(event, StdoutGarbage):
            self.garbage.append(event.text)
            if len(self.garbage) <= 5:
                self._log("warning", f"The worker printed something that is not a message: {event.text[:200]}")
        elif isinstance(event, Exited):
            self._on_exit(event.returncode)

    def _on_exit(self, returncode: int) -> None:
        if self._error is not None:
            kind = self._error.kind or "internal"
            if kind == "internal" and self.stderr_tail:
                log.error("hsam.worker stderr (last lines):\n%s", "\n".join(list(self.stderr_tail)[-40:]))
            message = str(self._error.message).strip() or "the worker reported an error without a message"
            if kind == "internal":
                message += " (this looks like a bug; the worker's log is in the Python console)"
            self._fail(message, kind)
            return
        if self._result is not None and returncode == 0:
            self._use_result(self._result)
            return
        if self._result is not None:
            self._fail(f"the {self.WHAT} worker reported a result but then {describe_exit(returncode)}", "internal")
            return
        details = []
        last = next((line.strip() for line in reversed(self.stderr_tail) if line.strip()), "")
        if last:
            details.append(f"its last message was: {last[:300]}")
        if self.garbage:
            details.append(f"it printed {len(self.garbage)} line(s) that are not protocol messages, e.g. "
                           f"{self.garbage[0][:120]!r}")
        if self.stderr_tail:
            log.error("hsam.worker stderr (last lines):\n%s", "\n".join(list(self.stderr_tail)[-40:]))
        what = describe_exit(returncode) if returncode != 0 else "ended without sending a result"
        self._fail(f"the {self.WHAT} worker {what}" + ("; " + "; ".join(details) if details else ""), "internal")

    # ------------------------------------------------------------------------------------------ hooks
    def _check(self) -> None:
        """Raise a readable HSAMError if the run cannot start (nothing may be changed here)."""

    def _download_choice(self) -> ModelChoice | None:
        """The model whose weights must be present before the worker starts (downloaded if needed)."""
        return None

    def _worker_arguments(self, folder: Path) -> list[str]:
        """Write the worker's input files into ``folder``; return its command line (after ``-m hsam.worker``)."""
        raise NotImplementedError

    def _started_message(self) -> str:
        return f"Started the {self.WHAT} worker."

    def _on_log(self, message: str) -> None:
        """Every log message of the worker (after it was added to ``log_lines``)."""

    def _use_result(self, result: protocol.Result) -> None:
        """The worker succeeded: use its result and finish (``_finish(SUCCEEDED)``) or ``_fail``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _fail(self, message: str, kind: str = "internal") -> None:
        if self.finished:
            return
        self._cancel_download.set()
        message = message[:1].upper() + message[1:]
        self.error_message, self.error_kind = message, kind
        self._log("error", message)
        self._finish(JobState.FAILED)

    def _finish(self, state: JobState) -> None:
        self.finished_at = self.clock()
        if self.process is not None:
            self.process.kill()  # strays the worker left behind (its process group); no-op if all ended
        self._cleanup()
        self._set_state(state)

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _set_state(self, state: JobState) -> None:
        self.state = state
        self._notify("state")

    def _set_progress(self, info: ProgressInfo) -> None:
        self.progress = info
        self._notify("progress")

    def _log(self, level: str, message: str) -> None:
        self.log_lines.append((level, message))
        getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(
            "HSAMSegment: %s", message)
        self._notify("log")

    def _notify(self, what: str) -> None:
        if self.listener is not None:
            try:
                self.listener(self, what)
            except Exception:  # a GUI callback error must not break the job
                log.exception("HSAMSegment: listener failed")


class SegmentJob(WorkerJob):
    """A segment run: pre-flight checks, weights download, the worker process, the import into the scene.
    After success ``labels`` holds the predicted label map (k, j, i) and ``label_set`` its classes (what the
    fine-tuning section compares the user's corrections with)."""

    WHAT = "segmentation"

    def __init__(self, scene: Any, request: SegmentRequest, launcher: WorkerLauncher | None = None,
                 undo: scene_io.UndoStore | None = None, listener: Listener | None = None,
                 temp_root: str | None = None, fetch: Callable[..., None] = fetch_weights,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(scene, launcher, listener, temp_root, fetch, clock)
        self.request = request
        self.undo = undo
        self.labels: Any = None
        self.label_set: Any = None

    def _check(self) -> None:
        req = self.request
        scene_io.check_input_volume(req.volume)
        scene_io.check_output_segmentation(req.output, req.volume)
        if req.device not in DEVICES:
            raise SegmentInputError(f"unknown device {req.device!r}; choose one of {', '.join(DEVICES)}")
        if req.model is None:
            raise SegmentInputError("Select a model first (or import weights from a file).")
        if req.model.problem:
            raise SegmentInputError(f"the model '{req.model.label}' cannot be used: {req.model.problem}")
        if req.batch_size is not None and req.batch_size < 1:
            raise SegmentInputError("the batch size must be at least 1")
        if (req.guide_labels is None) != (not req.guide_slices):
            raise SegmentInputError("a guided run needs both the corrected labels and the list of corrected slices")
        if req.guide_labels is not None:
            dims = req.volume.GetImageData().GetDimensions()
            if tuple(req.guide_labels.shape) != (dims[2], dims[1], dims[0]):
                raise SegmentInputError("the corrected labels do not lie on the input volume's voxel grid")

    def _download_choice(self) -> ModelChoice | None:
        return self.request.model

    def _worker_arguments(self, folder: Path) -> list[str]:
        req = self.request
        input_path = scene_io.export_volume(req.volume, folder / "input.nrrd")
        args = ["segment", "--input", str(input_path), "--output", str(folder / "labels.nrrd"),
                *req.model.worker_args(), "--device", req.device]
        if req.batch_size:
            args += ["--batch-size", str(req.batch_size)]
        if req.guide_labels is not None:
            guide = scene_io.write_on_volume_grid(req.guide_labels, req.volume, folder / "corrected-labels.nrrd",
                                                  "the corrected labels")
            args += ["--guide-labels", str(guide), "--guide-slices", ",".join(str(k) for k in req.guide_slices)]
        return args

    def _started_message(self) -> str:
        req = self.request
        return f"Started the worker on {req.volume.GetName()} with '{req.model.title}' (device: {req.device})."

    def _use_result(self, result: protocol.Result) -> None:
        req = self.request
        if req.volume.GetScene() is not self.scene:
            self._fail("the input volume was removed from the scene during the run; nothing was added", "input")
            return
        if req.output is not None and req.output.GetScene() is not self.scene:
            self._fail("the output segmentation was removed from the scene during the run; nothing was changed",
                       "input")
            return
        self._set_state(JobState.IMPORTING)
        self._set_progress(ProgressInfo("import"))
        output_path = Path(result.output)
        if not output_path.is_absolute() and self._tmp is not None:
            output_path = self._tmp / output_path
        name = req.name or f"{req.volume.GetName()} H-SAM segmentation"
        attributes = {"Model": result.model or req.model.id, "Device": req.device}
        if req.guide_slices:
            attributes["GuidedBySlices"] = ",".join(str(k) for k in req.guide_slices)
        request = scene_io.ImportRequest(output_path, result.labels, req.volume, req.output, req.show3d, name,
                                         attributes)
        self.result_node, self.labels, self.label_set = scene_io.import_result(self.scene, request, self.undo,
                                                                               with_labels=True)
        self.warnings = [str(w) for w in (result.warnings or [])]
        for warning in self.warnings:
            self._log("warning", warning)
        names = scene_io.segment_names(self.result_node)
        worker_seconds = f" ({result.seconds:.1f} s in the worker)" if result.seconds else ""
        self._log("info", f"Done in {self.seconds:.1f} s{worker_seconds}: {len(names)} segments in "
                          f"'{self.result_node.GetName()}'.")
        self._finish(JobState.SUCCEEDED)
