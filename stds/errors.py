"""Errors that the entrypoints report as one line, without a traceback."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def find_in_chain(exc: BaseException, kind: type[E], context: bool = False) -> E | None:
    """``exc`` if it is a ``kind``, else the first ``kind`` it was raised from (``__cause__``), or
    also during (``__context__``) when ``context`` is set; None if there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or (current.__context__ if context else None)
    return None


def user_error(exc: BaseException) -> StdsError | None:
    """The `StdsError` that ``exc`` is or wraps (Hydra's InstantiationException, chained causes)."""
    return find_in_chain(exc, StdsError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(exc).split()) or type(exc).__name__


def error_line(exc: BaseException) -> str:
    """``ExceptionType: message`` on one line, ending in a newline: the text of ``error.txt``."""
    return f"{type(exc).__name__}: {one_line(exc)}\n"


class StdsError(Exception):
    """A problem the user can fix; its message is one line naming the key or file and the fix."""


class ConfigError(StdsError, ValueError):
    """An invalid configuration value (names the config key and the valid values)."""


class DatasetNotFoundError(StdsError, FileNotFoundError):
    """A dataset is not where the config says (names the path and how to fix it)."""


class CheckpointError(StdsError, RuntimeError):
    """A checkpoint is corrupt or does not fit the run (names the file)."""


class RunDirError(StdsError, RuntimeError):
    """A run directory cannot be used: read-only, full, or in use by another process (names it)."""


class NonFiniteLossError(StdsError, FloatingPointError):
    """The loss became NaN or inf (names the epoch and step)."""


class ExportError(StdsError, ValueError):
    """A trained network cannot be written in the asked format (names the layer and why)."""
