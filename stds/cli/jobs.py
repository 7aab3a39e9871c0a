"""What a Hydra job returned, read once for the launcher and the search."""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobStatus

from stds.errors import error_line

__all__ = ["job_error"]


def job_error(returned: Any) -> str | None:
    """The failure a Hydra `JobReturn` carries, as one line (``Type: message``); None when the
    job did not fail. Hydra catches the task's exception and keeps it as the return value."""
    if returned is None or getattr(returned, "status", None) != JobStatus.FAILED:
        return None
    error = getattr(returned, "_return_value", None)
    return error_line(error).strip() if isinstance(error, BaseException) else "the job failed"
