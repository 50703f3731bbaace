"""The work behind the HSAMSegment module: parameters, scene I/O, the background worker process, the segment
job, model and device lists, dependency installation.

Nothing here imports torch, Qt or the desktop application at import time: everything but ``parameters``
(which needs Slicer's ``parameterNodeWrapper`` for its wrapped class) runs with PyPI's ``slicer-core`` too.
Importing this package puts the bundled H-SAM core (``hsam``) on ``sys.path``.
"""

from .corepath import bundled_core_dir, ensure_core_importable

ensure_core_importable()

__all__ = ["bundled_core_dir", "ensure_core_importable"]
