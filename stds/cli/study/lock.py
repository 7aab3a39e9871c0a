"""One search at a time in a sweep directory: ``<sweep dir>/.search.lock``."""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stds.errors import StdsError
from stds.run.files.safe import open_lock

__all__ = ["sweep_lock"]


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep dir>/.search.lock`` while the search runs: trials this directory started
    and never reported are then known to belong to a search that stopped."""
    path = sweep_dir / ".search.lock"
    with open_lock(path) as handle:  # O_NOFOLLOW: never opened through a planted symlink
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StdsError(f"a search is already running in {sweep_dir} ({holder}); wait for it to end "
                            "or give this one another hydra.sweep.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)



