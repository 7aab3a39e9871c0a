"""One search at a time in a sweep directory: ``<sweep dir>/.search.lock``."""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stds.errors import StdsError
from stds.run.files.rundir import LOCK_NAME

__all__ = ["run_is_live", "sweep_lock"]


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep dir>/.search.lock`` while the search runs: trials this directory started
    and never reported are then known to belong to a search that stopped."""
    path = sweep_dir / ".search.lock"
    with path.open("a+") as handle:
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




def run_is_live(run_dir: Path) -> bool:
    """Whether a process holds ``<run dir>/.lock`` (`stds.run.files.rundir.RunLock`): a trial's
    run that is training now. The probe takes the lock for an instant and gives it back; a
    symlinked ``.lock`` is not followed."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # no lock file: no run has it (a finished run deletes it)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
