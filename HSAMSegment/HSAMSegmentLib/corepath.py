"""Where the bundled H-SAM core (the ``hsam`` package) lives, and making it importable.

Two layouts are supported:

* installed extension: ``<qt-scripted-modules>/HSAMCore/hsam`` next to ``HSAMSegment.py``
  (the module CMakeLists.txt installs it there);
* source tree ("Add module path" pointing at ``<repo>/HSAMSegment``): ``<repo>/HSAMCore/hsam``.

The bundled copy wins over any other ``hsam`` on ``sys.path`` so the module and its worker process always run
the same core.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent
"""The folder holding ``HSAMSegment.py``."""

ENV_CORE_DIR = "HSAM_CORE_DIR"


def bundled_core_dir() -> Path:
    """The folder that contains the ``hsam`` package (the one to put on ``PYTHONPATH``)."""
    override = os.environ.get(ENV_CORE_DIR, "").strip()
    candidates = ([Path(override)] if override else []) + [MODULE_DIR / "HSAMCore", MODULE_DIR.parent / "HSAMCore"]
    for candidate in candidates:
        if (candidate / "hsam" / "__init__.py").is_file():
            return candidate.resolve()
    raise RuntimeError(
        "the H-SAM core (folder HSAMCore/hsam) is missing from the HSAMSegment module at "
        f"{MODULE_DIR}; reinstall the HSAMExtension from the Extension Manager")


def ensure_core_importable() -> Path | None:
    """Put the bundled core first on ``sys.path``; return its folder (None if it cannot be found)."""
    try:
        core = bundled_core_dir()
    except RuntimeError:
        return None
    text = str(core)
    if text not in sys.path:
        sys.path.insert(0, text)
    return core
