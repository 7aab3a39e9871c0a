"""Atomic writes: the one way `stds` writes a file that a reader or a kill must never see half
written (checkpoints, ``metrics.json``, ``metrics.jsonl`` rewrites, ``.hydra/*.yaml``, ``pruned.pt``).

The content goes to ``.<name>.<random>.tmp`` in the same directory, is flushed to disk (fsync),
then renamed over ``path`` (atomic on POSIX file systems). Any failure removes the temporary and
leaves the previous ``path`` as it was; a temporary left by a kill is removed by
`stds.run.files.rundir.remove_stale_temporaries`. The temporary is made with ``O_CREAT|O_EXCL``
(never an existing file), and the rename replaces a symlink at ``path`` instead of writing through
it, so a planted link never sends a write elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

from stds.errors import StdsError

Content = Union[str, bytes, Callable[[BinaryIO], None]]


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path | str, content: Content, replace: bool = True) -> None:
    """Replace ``path`` with ``content``: text (UTF-8), bytes, or a function writing to a binary file.

    ``replace=False``: write ``path`` only if nothing is there (not even a link), else raise
    `FileExistsError`; the finished temporary is hard-linked to ``path`` (atomic, and never through
    a link), so of several processes writing at once exactly one wins, whole.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise StdsError(f"cannot write {path}: it is a directory; give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp_name, path)
        else:
            os.link(tmp_name, path, follow_symlinks=False)
            os.unlink(tmp_name)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp_name).unlink(missing_ok=True)
        raise
