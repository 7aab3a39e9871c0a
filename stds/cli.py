"""What the entrypoints share: one-line errors instead of tracebacks for problems users can fix."""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from stds.errors import StdsError

log = logging.getLogger("stds")
T = TypeVar("T")


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_errors(work: Callable[[], T]) -> T:
    """Run ``work``; a `StdsError` becomes one ``Error: ...`` line on stderr and exit status 1.

    In a Hydra multirun the error is raised on, so the launcher marks that sweep point failed and
    the others go on (the run directory keeps the line in ``error.txt``). ``HYDRA_FULL_ERROR=1``
    shows the traceback in every case.
    """
    import os

    try:
        return work()
    except StdsError as exc:
        if _multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", exc)
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
