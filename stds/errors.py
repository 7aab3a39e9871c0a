"""Errors that the entrypoints report as one line, without a traceback."""


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
