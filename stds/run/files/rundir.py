"""Safety of a run directory: one writer at a time, writable before training, no stale temporaries.

- `check_writable`: a probe file proves a directory can be written (a read-only run directory or
  ``checkpoints/`` fails at once, in one line, not after the first epoch).
- `RunLock`: an exclusive ``flock`` on ``<run dir>/.lock`` for as long as a run uses the
  directory; a second process started on the same directory gets a `RunDirError` naming the
  holder. The kernel drops the lock when its holder exits or is killed; a holder that ends
  normally deletes the file, so a finished run keeps no ``.lock``.
- `lock_is_held`: whether a live process holds a run directory's ``.lock`` (the report's and a
  search's way to tell a running run from one that was killed).
- `remove_unstarted`: what a run that failed before its first step wrote (its saved config,
  lock, log), and the directory itself once empty.
- `remove_stale_temporaries`: the ``.<name>.*.tmp`` files a kill during `stds.run.files.checkpoint.save_atomic`
  leaves behind.
- `non_finite_entries`: the dotted names of NaN/inf values in a nested state (a checkpoint must
  not keep them).
- `continue_from`: copy what continuing another directory's run needs (its checkpoints, metrics
  lines and TensorBoard events) into a new run directory, which then resumes from them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from stds.errors import RunDirError
from stds.run.files.atomic import write_atomic
from stds.run.files.safe import open_binary, open_lock

LOCK_NAME = ".lock"
_FIX_READ_ONLY = "make it writable (chmod u+w, free disk space) or set hydra.run.dir=<a writable directory>"


def check_writable(path: Path | str) -> None:
    """Make ``path`` (a directory) if needed and prove it writable by writing a probe file.

    Raises `RunDirError` naming the directory, the reason (read-only file system, permission,
    full disk, a file in the way) and the fix.
    """
    path = Path(path)
    probe = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)  # O_EXCL: never a planted link
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"stds")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise RunDirError(f"cannot write in {path} ({exc.strerror or exc}); {_FIX_READ_ONLY}") from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)


def remove_stale_temporaries(ckpt_dir: Path | str) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files of interrupted checkpoint writes; returns what went.

    `stds.run.files.checkpoint.save_atomic` writes ``.last.pt.<random>.tmp`` next to ``last.pt`` and renames
    it; a process killed in between leaves the temporary. Call this only while holding `RunLock`
    (another writer's temporary is not stale).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for path in sorted(ckpt_dir.glob(".*.tmp")):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


UNSTARTED_FILES = (".hydra", "error.txt", LOCK_NAME, "checkpoints")
"""What a run writes in its directory before its first step (`remove_unstarted` deletes them)."""


OLDER_RUN_FILES = ("metrics.json", "metrics.jsonl", "tb", "error.txt", "pruned.pt", "model.nir",
                   "checkpoints/best.pt")
"""What a run writes that a later fresh start in the same directory must not pass off as its own."""


def set_aside_older_run(run_dir: Path | str) -> Path | None:
    """Move what an older run left in ``run_dir`` (`OLDER_RUN_FILES`, when ``metrics.json``,
    ``metrics.jsonl`` or ``tb/`` is among them) into ``run_dir/previous-<date>-<time>/``; the
    folder, or None when there was nothing. ``rename`` moves a symlink as the link it is."""
    run_dir = Path(run_dir)
    present = [name for name in OLDER_RUN_FILES if os.path.lexists(run_dir / name)]
    if not {"metrics.json", "metrics.jsonl", "tb"} & set(present):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        folder = run_dir / (f"previous-{stamp}" + (f"-{attempt}" if attempt else ""))
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            break
    for name in present:
        os.rename(run_dir / name, folder / Path(name).name)
    return folder


CONTINUED_FILES = ("checkpoints/best.pt", "metrics.jsonl", "tb", "checkpoints/last.pt")
"""What a run continued in another directory takes along (of ``tb/`` its plain files), in this
order: ``last.pt`` comes last, so a directory that holds it holds the rest."""


def continue_from(source: Path | str, run_dir: Path | str) -> Path | None:
    """Copy `CONTINUED_FILES` of ``source`` into ``run_dir``, so that a run started there resumes
    from ``source``'s ``checkpoints/last.pt`` (its metrics lines and events past that checkpoint
    are dropped by the resumed run, as in its own directory). The copied ``last.pt``, or None when
    ``source`` holds none (then nothing is copied). Each file is read as a regular file inside
    ``source`` (`stds.run.files.safe.open_binary`: no symlink followed) and written atomically."""
    source, run_dir = Path(source), Path(run_dir)
    if not (source / "checkpoints" / "last.pt").is_file() or os.path.islink(source / "checkpoints"):
        return None
    names = []
    for name in CONTINUED_FILES:
        if name != "tb":
            names += [name] if os.path.lexists(source / name) else []
        elif (source / "tb").is_dir() and not (source / "tb").is_symlink():
            names += [f"tb/{p.name}" for p in sorted((source / "tb").iterdir()) if p.is_file() and not p.is_symlink()]
    for name in names:
        with open_binary(source / name, source) as handle:
            write_atomic(run_dir / name, lambda out: shutil.copyfileobj(handle, out, 2**20))
    return run_dir / "checkpoints" / "last.pt"


def holds_only_unstarted(run_dir: Path | str, extra: list[Path] | tuple[Path, ...] = ()) -> bool:
    """Whether ``run_dir`` is missing or holds nothing but `UNSTARTED_FILES` (``checkpoints/``
    empty) and ``extra``: a directory no run has trained in (`remove_unstarted` may clear it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return True
    names = set(UNSTARTED_FILES) | {Path(path).name for path in extra}
    for path in run_dir.iterdir():
        if path.name not in names or (path.name == "checkpoints" and any(path.iterdir())):
            return False
    return True


def remove_unstarted(run_dir: Path | str, extra: list[Path] | tuple[Path, ...] = ()) -> None:
    """Delete what a run that never started left in ``run_dir``: `UNSTARTED_FILES` (``checkpoints/``
    only when empty) and ``extra`` (its log files), then ``run_dir`` itself if nothing else is in
    it. Anything else in the directory (a user's own files) stays, and so does the directory."""
    run_dir = Path(run_dir)
    for name in UNSTARTED_FILES:
        path = run_dir / name
        with contextlib.suppress(OSError):
            if name == "checkpoints":
                path.rmdir()  # only an empty one
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for path in extra:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
        _remove_empty_parents(run_dir)


def _remove_empty_parents(run_dir: Path) -> None:
    """Remove the empty folders above ``run_dir`` that lie inside ``./outputs`` (the date folder
    Hydra made for the default ``hydra.run.dir``); nothing outside it, nor ``outputs`` itself."""
    outputs = (Path.cwd() / "outputs").resolve()
    for parent in run_dir.resolve().parents:
        if parent == outputs or outputs not in parent.parents:
            return
        parent.rmdir()  # OSError when not empty: the caller stops there


def _holder(handle: TextIO) -> str:
    handle.seek(0)
    fields = dict(line.split("=", 1) for line in handle.read().splitlines() if "=" in line)
    if not fields:
        return "another process"
    started = fields.get("started", "?")
    return f"process {fields.get('pid', '?')} on {fields.get('host', '?')} (since {started})"


def lock_is_held(run_dir: Path | str) -> bool:
    """Whether a live process holds ``<run dir>/.lock`` (a run training there now). The probe
    takes a shared lock for an instant and gives it back; a symlinked ``.lock`` is not followed."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO: no wait
    except OSError:
        return False  # no lock file: no run holds it (a run that ends deletes it)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(run_dir):`` -- this process is the only one writing ``run_dir``.

    Takes an exclusive, non-blocking ``fcntl.flock`` on ``run_dir/.lock`` and writes the holder's
    pid, host name and start time into it. A second process (on this machine, or on another one
    sharing a file system whose locks reach across machines) gets a `RunDirError` naming the
    holder. Released on exit from the block and, by the kernel, when the process dies.
    Re-entering from the same process with another `RunLock` fails too: one owner per directory.
    The file is opened by `stds.run.files.safe.open_lock`: a symlink, FIFO or hard link at
    ``.lock`` is refused in one line; the holder's lines are written only into a file that is
    this directory's own (one link, regular), after its flock is taken.
    `release` deletes the file; a process that locked a file another one deleted meanwhile opens
    the new file and locks that instead (the lock must be on the file the path names).
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle: TextIO | None = None

    def acquire(self) -> None:
        """Take the lock or raise `RunDirError`."""
        for _ in range(10):
            handle = self._lock_file()
            if self._names(handle):
                break
            handle.close()  # released and deleted between our open and flock: lock the new file
        else:
            raise RunDirError(f"cannot lock {self.path}: it is deleted and made again by other processes; "
                              "set hydra.run.dir=<another directory>")
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={started}\n")
        handle.flush()
        self._handle = handle

    def _names(self, handle: TextIO) -> bool:
        """Whether ``self.path`` still names the file ``handle`` holds open."""
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            return False

    def _lock_file(self) -> TextIO:
        """Open ``self.path`` and take the flock on it; `RunDirError` if it is held or unusable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open_lock(self.path)  # O_NOFOLLOW: a planted symlink is refused, never written
        except OSError as exc:
            raise RunDirError(f"cannot lock {self.path} ({exc.strerror or exc}); {_FIX_READ_ONLY}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(handle)
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(f"cannot lock {self.path} ({exc.strerror}); {_FIX_READ_ONLY}") from None
            raise RunDirError(
                f"run directory {self.path.parent} is in use by {holder}; wait for it to end, "
                "stop it, or set hydra.run.dir=<another directory>"
            ) from None
        return handle

    def release(self) -> None:
        """Delete the file, then drop the lock (deleting first: no process can lock the old file
        after this one let go and still find it at the path)."""
        if self._handle is not None:
            if self._names(self._handle):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _float_leaves(state: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    """Collect ``(dotted name, value)`` for every float and floating tensor in ``state``."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            out.append((prefix, state))
    elif isinstance(state, float):
        out.append((prefix, state))
    elif isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        for key, value in items:
            _float_leaves(value, f"{prefix}.{key}" if prefix else str(key), out)


def non_finite_entries(state: Any) -> list[str]:
    """Dotted names of the NaN/inf floats and floating tensors in a nested dict/list/tuple.

    ``{"model": {"fc.weight": tensor([1, nan])}, "optimizer": {0: {"exp_avg": ...}}}`` gives
    ``["model.fc.weight"]``; list items are named by their index. Integer and bool tensors,
    strings and other leaves are never non-finite. The tensors of one device are checked
    together, so a GPU state costs one transfer per device, not one per tensor.
    """
    leaves: list[tuple[str, Any]] = []
    _float_leaves(state, "", leaves)
    bad = {name for name, value in leaves if isinstance(value, float) and not math.isfinite(value)}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, value in leaves:
        if isinstance(value, torch.Tensor) and value.numel():
            by_device.setdefault(value.device, []).append((name, value))
    for tensors in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
        bad.update(name for (name, _), ok in zip(tensors, finite) if not ok)
    return [name for name, _ in leaves if name in bad]
