"""The JSON-lines protocol between a front end (the Slicer module) and ``python -m hsam.worker``.

No torch here: the Slicer panel imports this before torch is installed.

The worker writes one JSON object per line on stdout (anything else on stdout is a bug; Python warnings
and library chatter go to stderr). Every message has ``"type"``:

``{"type": "progress", "done": 12, "total": 140, "stage": "segment"}``
    ``done``/``total`` slices (or epochs for fine-tuning), monotonic; ``stage`` names the phase
    (``"load"``, ``"segment"``, ``"write"``, ...).
``{"type": "log", "level": "info"|"warning"|"error", "message": "..."}``
    human-readable lines for the panel's log.
``{"type": "result", "output": "/tmp/…/labels.nrrd", "labels": {...label set JSON...}, "model": "...",
   "warnings": [...], "seconds": 12.3}``
    the last message of a successful run: a label map on the input's voxel grid and its label set.
``{"type": "error", "kind": "input"|"model"|"disk"|"cancelled"|"internal", "message": "..."}``
    the last message of a failed run; ``message`` is for the user (no traceback; an internal error's
    traceback goes to stderr).

Exit status: 0 after ``result``; non-zero after ``error``. A cancelled run is ended by the front end
killing the process; it then writes nothing the front end would read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Union

PROTOCOL_VERSION = 1


@dataclass
class Progress:
    done: int
    total: int
    stage: str = "segment"
    type: str = "progress"


@dataclass
class Log:
    message: str
    level: str = "info"
    type: str = "log"


@dataclass
class Result:
    output: str
    labels: dict
    model: str = ""
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    type: str = "result"


@dataclass
class Error:
    message: str
    kind: str = "internal"
    type: str = "error"


Message = Union[Progress, Log, Result, Error]
_TYPES = {"progress": Progress, "log": Log, "result": Result, "error": Error}


def encode(message: Message) -> str:
    """One protocol line (no trailing newline)."""
    return json.dumps(asdict(message), separators=(",", ":"))


def decode(line: str) -> Message:
    """Parse one line; raises ValueError for anything that is not a protocol message."""
    data: dict[str, Any] = json.loads(line)
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in _TYPES:
        raise ValueError(f"not a worker message: {line[:200]!r}")
    cls = _TYPES[kind]
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"malformed {kind} message: {line[:200]!r}") from exc
