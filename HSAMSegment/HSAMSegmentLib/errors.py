"""Errors the panel shows as they are (they say what happened, why, and what to do).

They derive from the core's :class:`hsam.errors.HSAMError`, so one ``except HSAMError`` in the Widget catches
both the core's user-facing errors and these.
"""

from __future__ import annotations

from hsam.errors import HSAMError


class SegmentInputError(HSAMError):
    """The input volume or the output segmentation cannot be used (checked before anything changes)."""


class WorkerFailed(HSAMError):
    """The background worker reported an error, crashed, or spoke something other than the protocol."""

    def __init__(self, message: str, kind: str = "internal") -> None:
        super().__init__(message)
        self.kind = kind


class DependencyError(HSAMError):
    """A Python package H-SAM needs is missing and was not (or could not be) installed."""


class ImportResultError(HSAMError):
    """The worker's result could not be turned into a segmentation (the scene was left unchanged)."""
