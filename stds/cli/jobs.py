"""What a Hydra job returned, read once for the launcher and the search."""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobStatus

from stds.errors import error_line

__all__ = ["job_error", "reason"]


def job_error(returned: Any) -> str | None:
    """The failure a Hydra `JobReturn` carries, as one line (``Type: message``); None when the
    job did not fail. Hydra catches the task's exception and keeps it as the return value."""
    if returned is None or getattr(returned, "status", None) != JobStatus.FAILED:
        return None
    error = getattr(returned, "_return_value", None)
    return reason(error) if isinstance(error, BaseException) else "the job failed"


def reason(exc: BaseException) -> str:
    """``Type: message`` on one line: why a trial or job failed, as ``error.txt`` would say it."""
    return error_line(exc).strip()
