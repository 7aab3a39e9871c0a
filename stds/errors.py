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


def _original_line(message: str) -> str:
    """``message``, or, when it is a DataLoader worker's re-raised text ("Caught DataError in
    DataLoader worker process 0. Original Traceback ... stds.errors.DataError: <line>"), the
    original one line at its end."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1].strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == "DataError" else last


class DataError(StdsError, ValueError):
    """A data file that cannot be used (an image that does not decode; too many such), naming it.

    An error raised in a DataLoader worker reaches the training process re-created from its text:
    the traceback of the worker, flattened to one line by the CLI. This class keeps only its own
    line, so the user sees the file's name and the fix, with or without loader workers.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_line(str(message)))


class CheckpointError(StdsError, RuntimeError):
    """A checkpoint is corrupt or does not fit the run (names the file)."""


class RunDirError(StdsError, RuntimeError):
    """A run directory cannot be used: read-only, full, or in use by another process (names it)."""


class NonFiniteLossError(StdsError, FloatingPointError):
    """The loss became NaN or inf (names the epoch and step)."""


class ExportError(StdsError, ValueError):
    """A trained network cannot be written in the asked format (names the layer and why)."""
