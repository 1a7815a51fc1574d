"""Errors a user can cause.

Every one of them is a `CnnkitError`: the CLI prints its message on one line and exits with
status 2, without a traceback. A message names the file (and line, where there is one) and the fix.
"""

from __future__ import annotations


class CnnkitError(Exception):
    """Base class for every mistake a user can make; `exit_code` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 fix: str | None = None):
        self.path = path
        self.line = line
        self.fix = fix
        self.reason = message
        super().__init__(self._format(message))

    def _format(self, message: str) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        text = f"{where}{message}"
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


class UsageError(CnnkitError, ValueError):
    """A malformed command-line value or argument combination."""


class ShapeError(CnnkitError, ValueError):
    """A tensor or input size that cannot work (e.g. a kernel larger than the padded input)."""


class ModelError(CnnkitError, ValueError):
    """An unknown model name or an impossible model configuration."""


class DataError(CnnkitError):
    """A dataset problem: missing path, corrupt image, malformed label, inconsistent classes."""


class WeightsError(CnnkitError):
    """A missing, unreadable or mismatched weights / checkpoint file."""
