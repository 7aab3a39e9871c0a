"""Atomic checkpoints that load with ``torch.load(path, weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (see
``docs/architecture.md``), written by `stds.run.files.atomic.write_atomic`, so a process killed during a
save leaves the last good checkpoint in place. `upgrade` reads every older layout.
"""

from __future__ import annotations

import errno
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stds.errors import CheckpointError, find_in_chain
from stds.run.files.atomic import write_atomic
from stds.run.files.safe import open_binary

FORMAT_VERSION = 2
"""The layout `save_atomic` writes; `upgrade` brings every older layout to it.

- 1, first form: no schedule state (d was a function of the step), ``epoch_sums`` a list
  [loss·n, correct, n], ``history`` (every epoch's record) instead of ``last_record``,
  ``config.amp`` a bool, the reparameterizations' d in buffers ``...parametrizations.weight.0.flat_width``.
- 1, second form (same number): ``threshold`` (the schedule's state), named ``epoch_sums``,
  ``last_record``, ``config.amp`` a string; buffers still ``...flat_width``.
- 2: ``schedule`` (the state of d's schedule), buffers ``...parametrizations.weight.0.d`` and
  ``best_sparsity`` (the sparsity of the epoch in ``best.pt``; 0 from older files, so the next
  epoch at the final sparsity becomes the best), ``pending_eval`` (an epoch checkpointed before
  its evaluation, which a resumed run evaluates first; None from older files).
"""
LAST = "last.pt"
BEST = "best.pt"
PRUNED_FORMAT_VERSION = 1
"""The layout of an exported ``pruned.pt`` (`stds.results.pruned`), checked by ``init_from``."""


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
    try:
        write_atomic(path, lambda handle: torch.save(state, handle))
    except BaseException as exc:
        # torch.save reports a failed write to a file object as a RuntimeError ("unexpected pos")
        # raised while the OSError of the write is being handled; the OSError says why
        error = find_in_chain(exc, OSError, context=True) if isinstance(exc, Exception) else None
        if error is not None:
            raise _write_error(path, error) from exc
        raise


def load(path: Path, root: Path | str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic`; a corrupt or foreign file is a `CheckpointError`.
    It is opened by `stds.run.files.safe.open_binary`: a symlink at ``path``, or a folder that leads
    outside ``root`` (the run directory; default: the checkpoint's own folder), is refused
    (`UnsafeFileError`), never followed."""
    try:
        handle = open_binary(path, Path(path).parent if root is None else root)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of a checkpoints/*.pt") from None
    try:
        with handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
            "delete it to start the run afresh, or restore a good copy"
        ) from None
    return upgrade(state, path)


def upgrade(state: Any, path: Path) -> dict[str, Any]:
    """``state`` in the layout of `FORMAT_VERSION`, from any layout listed there (the one place
    that knows the old layouts); a foreign file or a newer format is a `CheckpointError`."""
    version = state.get("format_version") if isinstance(state, dict) else None
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"checkpoint {path} is " + (f"of format {version}, newer than this stds reads ({FORMAT_VERSION}); "
                                        "upgrade stds" if newer else
                                        "not a stds checkpoint; delete it or point the run at another directory")
        )
    if version == 1:
        state = _upgrade_from_1(dict(state))
    return state


_OLD_D_SUFFIX = ".0.flat_width"


def _upgrade_from_1(state: dict[str, Any]) -> dict[str, Any]:
    """Both forms of format 1 to format 2 (see `FORMAT_VERSION`)."""
    model = {}
    for key, value in state.get("model", {}).items():
        if key.endswith(_OLD_D_SUFFIX) and ".parametrizations." in key:
            key = key[: -len("flat_width")] + "d"
        model[key] = value
    state["model"] = model
    if "threshold" in state:
        state["schedule"] = state.pop("threshold")
    else:  # first form: d was set from the step; every layer's buffer holds it
        buffers = [v for k, v in model.items() if k.endswith(".0.d") and ".parametrizations." in k]
        state["schedule"] = {"d": float(buffers[0]) if buffers else 0.0}
    sums = state.get("epoch_sums")
    if isinstance(sums, (list, tuple)):
        state["epoch_sums"] = {"loss": sums[0], "correct": sums[1], "samples": sums[2]}
    if "last_record" not in state:
        history = state.pop("history", None) or [None]
        state["last_record"] = history[-1]
    config = state.get("config")
    if isinstance(config, dict) and isinstance(config.get("amp"), bool):
        state["config"] = {**config, "amp": "fp16" if config["amp"] else "false"}
    state.setdefault("best_sparsity", 0.0)
    state.setdefault("pending_eval", None)
    state["format_version"] = 2
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
