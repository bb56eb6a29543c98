"""Errors that reach users as one clear line."""

from __future__ import annotations

import errno
import os
import re


class SpinflowError(Exception):
    """An error whose message is meant for the user, printed without a traceback.

    ``path``: the file or directory at fault, when there is one; the stage runner adds how to
    restore it when it is an output of the pipeline.
    """

    def __init__(self, message: str = "", *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = path


class ConfigError(SpinflowError):
    """params.yaml (or another config file) is invalid."""


class DataError(SpinflowError):
    """An input data file is missing or malformed."""


class ModelError(SpinflowError):
    """A model source cannot be resolved or loaded."""


class TrainingError(SpinflowError):
    """Training cannot continue (for example a NaN loss)."""


class OutputError(SpinflowError):
    """An output cannot be written: the disk is full, the file system is read-only, no permission.

    ``path`` is the output that was being written, ``code`` the errno.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, code: int = 0):
        super().__init__(message, path=path)
        self.code = code


# What the user can do about an errno met while writing an output.
WRITE_ERRORS: dict[int, str] = {
    errno.ENOSPC: "no space left on device (the disk is full); free some space",
    errno.EDQUOT: "disk quota exceeded; free some space or raise the quota",
    errno.EROFS: "read-only file system; make it writable",
    errno.EACCES: "permission denied; check who owns it and its directory",
    errno.EPERM: "operation not permitted; check who owns it and its directory",
    errno.EFBIG: "file too large for this file system or for the file-size limit of this process (ulimit -f)",
}
# Rust libraries (safetensors, tokenizers) report the errno only inside their message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_errno(exc: BaseException) -> int | None:
    """The errno of a write failure that :data:`WRITE_ERRORS` explains, else None."""
    if isinstance(exc, OutputError):
        return exc.code or None
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and not isinstance(exc, (SpinflowError, KeyboardInterrupt, SystemExit)):
        match = _RUST_OS_ERROR.search(str(exc))
        code = int(match.group(1)) if match else None
    return code if code in WRITE_ERRORS else None


def cannot_write(
    path: str | os.PathLike | None, exc: BaseException, *, detail: str = "", atomic: bool = False
) -> OutputError | None:
    """One line for a write failure of ``path`` (None when ``exc`` is no such failure).

    ``atomic``: the output was being written next to its place, and that partial copy is gone.
    """
    code = write_errno(exc)
    if code is None:
        return None
    what = f" {path}" if path is not None else ""
    where = f" ({detail})" if detail else ""
    left = "; nothing half-written was left in its place" if atomic else ""
    return OutputError(
        f"cannot write{what}{where}: {WRITE_ERRORS[code]}, then run it again{left}", path, code
    )
