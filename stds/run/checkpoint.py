"""Atomic checkpoints that load with ``torch.load(path, weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (see
``docs/architecture.md``). It is written to a temporary file in the same directory, flushed to
disk, then renamed over the old one, so a process killed during a save leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stds.errors import CheckpointError, find_in_chain

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _write_error(path: Path, error: OSError) -> CheckpointError:
    """The one-line `CheckpointError` for an OSError while writing ``path``, with its fix."""
    reason = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        fix = (f"free space on the file system of {path.parent} (or raise the quota / file-size "
               "limit), then run the same command again to resume")
    elif error.errno in _NOT_WRITABLE:
        fix = f"make {path.parent} writable, or set hydra.run.dir=<a writable directory>"
    else:
        fix = f"check {path.parent} (disk, mount, permissions) and run the same command again"
    return CheckpointError(f"cannot write checkpoint {path} ({reason}); the previous {path.name} is "
                           f"kept; {fix}")


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    Any failure removes the temporary file and leaves the previous ``path`` as it was. A write
    refused by the system (full disk or quota, read-only or not permitted, file too large) is a
    `CheckpointError` naming the file and the fix; other errors (a kill, a bug) pass unchanged.
    """
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                Path(tmp_name).unlink(missing_ok=True)
        # torch.save reports a failed write to a file object as a RuntimeError ("unexpected pos")
        # raised while the OSError of the write is being handled; the OSError says why
        error = find_in_chain(exc, OSError, context=True) if isinstance(exc, Exception) else None
        if error is not None:
            raise _write_error(path, error) from exc
        raise


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic`; a corrupt or foreign file is a `CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
            "delete it to start the run afresh, or restore a good copy"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a stds checkpoint of format {FORMAT_VERSION}; "
            "delete it or point the run at another directory"
        )
    return state


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch random states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    internal = tuple(int(v) for v in state["python_internal"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
