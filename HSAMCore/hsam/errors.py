"""User-facing errors. Every message says what happened, why, and what to do next.

The CLI and the Slicer worker print ``str(error)`` without a traceback for these; any other exception
is a bug and is reported with its traceback.
"""


class HSAMError(Exception):
    """Base class of errors caused by input, files or environment (not by a bug)."""

    exit_code = 2


class InputVolumeError(HSAMError):
    """The image volume cannot be segmented (wrong dimensionality, NaNs, unreadable, ...)."""


class ModelFileError(HSAMError):
    """A model or checkpoint file is missing, truncated, tampered with or of the wrong architecture."""


class ChecksumError(ModelFileError):
    """A file's SHA-256 differs from the expected one."""


class DownloadError(HSAMError):
    """A download failed (network, HTTP status, disk full)."""


class DiskFullError(HSAMError):
    """Not enough free disk space to write a file."""


class CancelledError(HSAMError):
    """The user cancelled a run; nothing partial was returned or written."""

    exit_code = 130
