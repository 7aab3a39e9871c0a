"""Atomic writes: the one way `stds` writes a file that a reader or a kill must never see half
written (checkpoints, ``metrics.json``, ``metrics.jsonl`` rewrites, ``.hydra/*.yaml``, ``pruned.pt``).

The content goes to ``.<name>.<random>.tmp`` in the same directory, is flushed to disk (fsync),
then renamed over ``path`` (atomic on POSIX file systems). Any failure removes the temporary and
leaves the previous ``path`` as it was; a temporary left by a kill is removed by
`stds.run.files.rundir.remove_stale_temporaries`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

Content = Union[str, bytes, Callable[[BinaryIO], None]]


def write_atomic(path: Path | str, content: Content) -> None:
    """Replace ``path`` with ``content``: text (UTF-8), bytes, or a function writing to a binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp_name).unlink(missing_ok=True)
        raise
